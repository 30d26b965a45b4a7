"""doit task generators: offline, from the plan (recipes, resolved state, doit's records).

Per unique layer ``layer:<hex>``, per unique image config ``flat:<hex>``, per image
``image:<name>`` (metadata and public link), ``gc:<repo>``, ``publish:<repo>`` and
``thin:<name>``. ``_txn:<repo>`` opens the repository's transaction as a setup task, so it
runs only when some work is stale. Generation never touches the network, so ``doit list``,
``info`` and ``forget`` work offline and fast; a ``doit`` run resolves first (``prepare_run``
in doit_ext), then generates. Up-to-date states are computed here, from the plan, rather than
by callables doit would inspect one by one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UnpackedError
from ..registry.resolved import Resolved
from ..repo.layout import hex_of, public_target
from .actions import (
    begin_transaction,
    fail,
    flatten,
    ingest,
    link,
    publish_repo,
    push_thin,
    run_gc,
)
from .plan import (
    SANDBOX_VERSION,
    ImagePlan,
    current_plan,
    current_settings,
    gc_plan,
    recipes_or_none,
    thin_targets,
)

# -- up-to-date checks (run in doit's main process: cheap, offline, never raising) --------------

def layer_status(values: dict, digest: str, dirs: list[str]) -> tuple[bool, str]:
    """Up to date when doit recorded this digest *and* every target layer folder is complete."""
    if values.get("digest") != digest:
        return False, "not recorded as ingested (new, or forgotten)"
    for d in dirs:
        # layer.json is written last inside a folder renamed into place whole
        if not os.path.isfile(os.path.join(d, "layer.json")):
            return False, f"{d} is missing"
    return True, "ingested"


def flat_status(values: dict, key: str, dirs: list[str], forced: str | None) -> tuple[bool, str]:
    """Up to date when built from these layers in this mode and present; forced after a forget."""
    if forced:
        return False, forced
    if values.get("key") != key:
        return False, "not recorded as built from these layers (new, or forgotten)"
    for d in dirs:
        if not os.path.isdir(d):
            return False, f"{d} is missing"
    return True, "built"


def image_status(values: dict, manifest: str, checks: list[tuple[str, str, str]]
                 ) -> tuple[bool, str]:
    """Up to date when the public path points at the flat image of the resolved manifest."""
    if values.get("manifest") != manifest:
        return False, f"not recorded as linked to {manifest} (new, moved, or forgotten)"
    for public, target, metadata in checks:
        try:
            got = os.readlink(public)
        except OSError:
            return False, f"{public} is missing"
        if got != target:
            return False, f"{public} points at {got}, not {target}"
        if not os.path.isfile(os.path.join(metadata, "image.json")):
            return False, f"{metadata} is missing"
    return True, "linked"


def thin_status(values: dict, key: str) -> tuple[bool, str]:
    """Up to date when this exact thin image (same bytes, same destination) was pushed."""
    if values.get("key") == key:
        return True, "pushed"
    return False, "not pushed in this form yet (new, changed, or forgotten)"


class TransactionClosed:
    """``publish`` has nothing to do unless this run opened the repository's transaction."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, task, values) -> bool:
        return not os.path.exists(self.marker)

    def __repr__(self) -> str:
        return "TransactionClosed(no transaction open)" if self(None, {}) else \
            "TransactionClosed(a transaction is open)"


def _txn(repo: str) -> str:
    return f"_txn:{repo}"


def task__txn():
    """Open a repository's transaction (a setup task: only when something is stale)."""
    s = current_settings()
    for repo in sorted({r.cvmfs_repo for r in recipes_or_none(s)}):
        yield {"name": repo, "actions": [(begin_transaction, [s, repo])],
               "doc": f"open the transaction of {repo}"}


def task_layer():
    """Download, verify and unpack one layer into .layers/<hex>."""
    plan = current_plan()
    s = plan.settings
    roots = {r: os.path.join(s.repo_root, r, ".layers") for r in plan.repos}
    for digest, entry in sorted(plan.layers.items()):
        repos = sorted(entry["repos"])
        dirs = [os.path.join(roots[r], hex_of(digest)) for r in repos]
        layer = entry["layer"]
        ok, why = layer_status(plan.recorded.get(f"layer:{hex_of(digest)}", {}), digest, dirs)
        yield {"name": hex_of(digest),
               "actions": [(ingest, [s, vars(layer), entry["ref"].url, repos])],
               "uptodate": [ok],
               "setup": [_txn(r) for r in repos],
               "doc": f"{max(layer.size, 0):,} bytes, used by {len(entry['images'])} image(s)",
               "meta": {"status": why, "digest": digest, "diff_id": layer.diff_id,
                        "size": layer.size,
                        "media_type": layer.media_type, "images": entry["images"][:20],
                        "folders": dirs},
               "verbosity": 2}


def task_flat():
    """Merge an image's layers into .flat/<config hex>, an Apptainer sandbox."""
    plan = current_plan()
    s = plan.settings
    for config, entry in sorted(plan.flats.items()):
        resolved: Resolved = entry["resolved"]
        repos = sorted(entry["repos"])
        mode = s.flatten_mode
        key = hashlib.sha256(json.dumps([config, [x.digest for x in resolved.layers], mode,
                                         SANDBOX_VERSION]).encode()).hexdigest()
        dirs = [str(s.repo_root / r / ".flat" / hex_of(config)) for r in repos]
        forced = None
        for item in entry["images"]:
            if f"image:{item.name}" not in plan.recorded and \
                    Path(s.repo_root / item.repo / item.public).is_symlink():
                forced = f"image:{item.name} was forgotten: rebuilding its flat image"
                break
        ok, why = flat_status(plan.recorded.get(f"flat:{hex_of(config)}", {}), key, dirs, forced)
        yield {"name": hex_of(config),
               "actions": [(flatten, [s, entry["name"], repos, key])],
               "task_dep": [f"layer:{hex_of(x.digest)}" for x in resolved.layers],
               "uptodate": [ok],
               "setup": [_txn(r) for r in repos],
               "doc": f"{len(resolved.layers)} layers, {len(entry['images'])} image(s)",
               "meta": {"status": why, "config": config,
                        "images": [i.name for i in entry["images"]][:20],
                        "layers": [x.digest for x in resolved.layers], "folders": dirs,
                        "mode": mode},
               "verbosity": 2}


def task_image():
    """Write an image's metadata and point its public path at its flat image."""
    plan = current_plan()
    s = plan.settings
    by_name: dict[str, list[ImagePlan]] = {}
    for item in plan.images:
        by_name.setdefault(item.name, []).append(item)
    for name, items in sorted(by_name.items()):
        first = items[0]
        meta = {"input": [i.input.written for i in items],
                "recipe": [f"{i.recipe.path}:{i.input.line}" for i in items],
                "repository": [i.repo for i in items], "public_path": [i.public for i in items]}
        if first.failure or first.resolved is None:
            reason = first.failure or f"{name}: not resolved yet (run doit)"
            meta["failure"] = reason
            yield {"name": name, "actions": [(fail, [reason])], "meta": meta,
                   "doc": "failed to resolve: " + reason, "verbosity": 2}
            continue
        resolved = first.resolved
        targets, checks = [], []
        for item in items:
            root = s.repo_root / item.repo
            wanted = public_target(item.public, resolved.config_digest)
            checks.append((str(root / item.public), wanted,
                           str(root / ".metadata" / name)))
            targets.append((item.repo, item.public, item.input.written))
        ok, why = image_status(plan.recorded.get(f"image:{name}", {}), resolved.manifest_digest,
                               checks)
        meta.update({"status": why, "tag_digest": resolved.top_digest,
                     "manifest": resolved.manifest_digest, "config": resolved.config_digest,
                     "platform": resolved.platform, "layers": [x.digest for x in resolved.layers]})
        yield {"name": name,
               "actions": [(link, [s, name, targets])],
               "task_dep": [f"flat:{hex_of(resolved.config_digest)}"],
               "uptodate": [ok],
               "setup": sorted({_txn(i.repo) for i in items}),
               "doc": f"{first.input.written} -> {', '.join(i.public for i in items)}",
               "meta": meta, "verbosity": 2}


def task_publish():
    """Publish each repository's transaction (nothing when the run changed nothing)."""
    plan = current_plan()
    s = plan.settings
    for repo in plan.repos:
        names = sorted({i.name for i in plan.images if i.repo == repo})
        marker = s.cache_dir / "transactions" / f"{repo}.json"
        gc_dep = [f"gc:{repo}"] if s.gc else []
        yield {"name": repo, "actions": [(publish_repo, [s, repo])],
               "task_dep": [f"image:{n}" for n in names] + gc_dep,
               "uptodate": [TransactionClosed(str(marker))],
               "doc": f"publish {repo} ({len(names)} images)", "verbosity": 2}


def task_thin():
    """Push thin images (thin.json naming CVMFS paths) for recipes with output_format."""
    plan = current_plan()
    s = plan.settings
    by_name: dict[str, list[ImagePlan]] = {}
    for item in plan.images:
        if item.recipe.output_format and item.resolved is not None and not item.failure:
            by_name.setdefault(item.name, []).append(item)
    for name, items in sorted(by_name.items()):
        targets, key = thin_targets(items)
        ok, why = thin_status(plan.recorded.get(f"thin:{name}", {}), key)
        yield {"name": name,
               "actions": [(push_thin, [s, name, targets, key])],
               "task_dep": sorted({f"publish:{i.repo}" for i in items}) + [f"image:{name}"],
               "uptodate": [ok],
               "doc": ", ".join(t[2] for t in targets),
               "meta": {"status": why, "output": [t[2] for t in targets], "images": [name]},
               "verbosity": 2}


# -- garbage collection ---------------------------------------------------------------------------

class NothingDue:
    """``gc:<repo>`` is up to date when nothing is due for deletion (no transaction then)."""

    def __init__(self, repo: str):
        self.repo, self.why = repo, "not checked"

    def __call__(self, task, values) -> bool:
        try:
            result = gc_plan(current_plan(), self.repo, save=False)
        except (OSError, UnpackedError) as exc:
            self.why = f"cannot plan: {exc}"
            return True
        self.why = (f"{len(result.due)} due, {len(result.pending)} pending, "
                    f"{len(result.waiting)} in their grace period")
        return not result.due

    def __repr__(self) -> str:
        return f"NothingDue({self.why})"


def task_gc():
    """Delete unreferenced images, flat images and layers past their grace period."""
    plan = current_plan()
    s = plan.settings
    for repo in plan.repos:
        yield {"name": repo, "actions": [(run_gc, [s, repo])],
               "uptodate": [NothingDue(repo)], "setup": [_txn(repo)],
               "doc": f"garbage collection of {repo} (grace {s.gc_grace:g} days, at most "
                      f"{s.gc_max_deletions} deletions a run)", "verbosity": 2}
