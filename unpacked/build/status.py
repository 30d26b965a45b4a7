"""What a run leaves for the people and programs that watch it.

``cache/status.json`` after every run (written atomically): its start, end, exit code,
counts, the reason of every failure and each repository's revision, plus running totals. A
Prometheus textfile (setting ``metrics_file``, node_exporter's textfile-collector conventions:
temp file + rename, ``# HELP``/``# TYPE``) says the same in numbers; the listener serves the
same text on ``/metrics``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..repo.fs import write_local

STATUS = "status.json"
TOTALS = ("layers_ingested", "flat_built", "bytes_downloaded", "gc_deleted", "thin_pushed",
          "failures", "runs")
STATES = ("added", "updated", "unchanged", "failed", "gone")


def read_status(cache_dir: Path) -> dict:
    try:
        doc = json.loads((cache_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def record_run(cache_dir: Path, run: dict, full: bool = True) -> dict:
    """Write ``status.json`` for the run just ended; totals carry over from the last one.

    A limited run (``unpacked convert``, the listener's, ``doit image:…``) is kept apart, as
    ``last_limited_run``: its success must not hide that the full runs keep failing."""
    previous = read_status(cache_dir)
    totals = dict.fromkeys(TOTALS, 0)
    totals.update({k: v for k, v in (previous.get("totals") or {}).items()
                   if k in totals and isinstance(v, int | float)})
    counts = run.get("counts", {})
    for key in TOTALS:
        totals[key] += counts.get(key, 0) if key != "runs" else 1
    if full:
        status = dict(run, totals=totals)
        status["last_success"] = run["end"] if run.get("exit_code") == 0 \
            else previous.get("last_success")
        if "last_limited_run" in previous:
            status["last_limited_run"] = previous["last_limited_run"]
    else:
        status = dict(previous, totals=totals, last_limited_run=run)
        status["repositories"] = {**(previous.get("repositories") or {}),
                                  **run.get("repositories", {})}
    write_local(cache_dir / STATUS, json.dumps(status, indent=1, sort_keys=True) + "\n",
                0o644, sync=True)
    return status


def _line(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> str:
    out = [f"# HELP unpacked_{name} {help_text}", f"# TYPE unpacked_{name} {kind}"]
    out += [f"unpacked_{name}{labels} {value:g}" for labels, value in samples]
    return "\n".join(out)


def render(status: dict, extra: list[str] | None = None) -> str:
    """The Prometheus text exposition of a status record."""
    counts, totals = status.get("counts", {}), status.get("totals", {})
    limited = status.get("last_limited_run") or {}
    blocks = [
        _line("last_run_timestamp_seconds", "gauge", "When the last run ended.",
              [("", status.get("end", 0))]),
        _line("last_run_duration_seconds", "gauge", "How long the last run took.",
              [("", status.get("duration_s", 0))]),
        _line("last_run_exit_code", "gauge", "The exit code of the last run (0: all fine).",
              [("", status.get("exit_code", 0))]),
        _line("last_success_timestamp_seconds", "gauge", "When a run last ended with code 0.",
              [("", status.get("last_success") or 0)]),
        _line("images", "gauge", "Images of the last run, by what happened to them.",
              [(f'{{state="{s}"}}', counts.get(s, 0)) for s in STATES]),
        _line("last_limited_run_timestamp_seconds", "gauge", "When the last limited run "
              "(unpacked convert, the listener's) ended.", [("", limited.get("end", 0))]),
        _line("last_limited_run_exit_code", "gauge", "The exit code of the last limited run.",
              [("", limited.get("exit_code", 0))]),
    ]
    for key, help_text in (("layers_ingested", "Layers downloaded and unpacked."),
                           ("flat_built", "Flat images built."),
                           ("bytes_downloaded", "Compressed layer bytes downloaded."),
                           ("gc_deleted", "Objects garbage collection deleted."),
                           ("thin_pushed", "Thin images pushed."),
                           ("failures", "Image and thin-image failures."),
                           ("runs", "Runs that ended.")):
        blocks.append(_line(f"{key}_total", "counter", help_text, [("", totals.get(key, 0))]))
    revisions = [(f'{{repository="{r}"}}', v.get("revision", 0))
                 for r, v in sorted((status.get("repositories") or {}).items())]
    blocks.append(_line("repository_revision", "gauge", "The published revision.", revisions))
    return "\n".join(blocks + (extra or [])) + "\n"


def write_metrics(path: Path, status: dict) -> None:
    write_local(path, render(status), 0o644, sync=True)


def images(ctx) -> list[dict]:
    """Every image the recipes want, with its state, digests, public path and last failure
    (offline: the resolved state, the repository's links and doit's records)."""
    from .plan import public_link
    plan, state = ctx.plan, ctx.state
    out = []
    for name, items in sorted(plan.by_name().items()):
        first = items[0]
        resolved = first.resolved
        entry = {"name": name, "inputs": [i.input.written for i in items],
                 "repositories": sorted({i.repo for i in items}),
                 "public_paths": [i.public for i in items],
                 "failure": plan.clashes.get(name) or first.failure}
        if resolved is not None:
            entry.update(tag_digest=resolved.top_digest,
                         platforms=[{"platform": i.platform, "manifest": i.manifest_digest,
                                     "config": i.config_digest} for i in resolved.images],
                         missing_platforms=list(resolved.missing))
        entry["state"] = _state(ctx, items, resolved, public_link, state.gone(name))
        out.append(entry)
    return out


def _state(ctx, items, resolved, public_link, gone: bool) -> str:
    root = ctx.settings.repo_root
    links = [os.readlink(root / i.repo / i.public) if os.path.islink(root / i.repo / i.public)
             else None for i in items]
    if gone and any(links):
        return "gone"
    if items[0].failure or items[0].name in ctx.plan.clashes:
        return "failed"
    if resolved is None:
        return "unresolved"
    variant = ctx.settings.publisher == "cvmfs"
    wanted = [public_link(i.public, i.name, resolved.images[0], len(resolved.images) > 1,
                          ctx.settings.cvmfs_arch, variant) for i in items]
    return "published" if links == wanted else "pending"
