"""What a person (or cron's mail) reads at the end of a run, and the exit code it ends with.

doit calls a reporter's hooks in the main process (``execute_task`` from the threads that
run the tasks, the others from the main thread), and ``complete_run`` at the very end even
after an interrupt: that is where the session closes its transactions and releases its
locks. Quiet in cron (only warnings, errors and a summary when something changed or failed,
every line timestamped), a line per task for a person.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
import traceback
from collections.abc import Set

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from .. import log as logs
from ..errors import EXIT_FAILED, EXIT_SETUP, environmental, from_os
from ..repo.layout import hex_of
from .session import Interrupted, Session, leave

log = logging.getLogger(__name__)
SHOWN = 20           # names listed per kind in a summary, then a count


def _task_reason(fail) -> str:
    text = fail.get_msg() if hasattr(fail, "get_msg") else str(fail)
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(fail).__name__


class Reporter(ConsoleReporter):
    """doit's reporter for a run of ``unpacked``."""

    desc = "unpacked: summary, exit code, transactions closed"

    def __init__(self, session: Session, outstream=sys.stdout):
        super().__init__(outstream, {})
        self.session = session
        self.interactive = logs.interactive()
        self.changes: dict[str, str] = {}
        self.unchanged: set[str] = set()
        self.failed: dict[str, str] = {}
        self.gone: dict[str, str] = {}
        self.other_failures: list[str] = []
        self.built = {"layer": 0, "flat": 0}
        self.thin_pushed = 0
        self.thin_failed: dict[str, str] = {}
        self.gc: dict[str, list[str]] = {"deleted": [], "pending": [], "errors": []}
        self.gc_blocked: list[str] = []
        self.task_names: Set[str] = set()
        self.published = False
        self.bytes_downloaded = 0
        self.began = time.time()

    def write(self, text: str) -> None:
        if not self.interactive:
            text = "".join(f"{logs.stamp()} {line}\n" for line in text.rstrip("\n").split("\n"))
        super().write(text)

    def initialize(self, tasks, selected_tasks):
        self.task_names = tasks.keys()     # doit's own, kept by it to the end (no copy)
        hex_of.cache_clear()        # the tasks are named: ~4 MiB of folder names at 10k images
        log.debug("%d tasks ready %.2fs after the start", len(tasks),
                  time.monotonic() - self.session.started)
        if not selected_tasks or any(t == "publish" or t.startswith("publish:")
                                     for t in selected_tasks):
            self.unchanged |= self.session.idle_images()   # never visited: nothing to do

    # -- per task -----------------------------------------------------------------------------

    def execute_task(self, task):
        if self.interactive and task.name.startswith(("layer:", "flat:", "image:", "platform:",
                                                      "publish:", "thin:")):
            self.write(f".  {task.name}\n")

    def skip_uptodate(self, task):
        if task.name.startswith("image:"):
            self.unchanged.add(task.name[6:])

    def add_success(self, task):
        values = task.values or {}
        kind, _, name = task.name.partition(":")
        if values.get("failed"):
            self._failed_task(task, values["failed"])
        elif values.get("gone"):
            self.gone[name] = values["gone"]
        elif kind == "image":
            self.changes[name] = values.get("change") or "rewritten"
        elif kind in self.built:
            self.built[kind] += 1
            self.bytes_downloaded += values.get("bytes") or 0
        elif kind == "thin":
            self.thin_pushed += len(values.get("pushed") or [])
        elif kind == "publish":
            self.published = True
            self.gc["errors"] += values.get("errors") or []
        elif kind == "gc":
            for key in self.gc:
                self.gc[key] += values.get(key) or []
            if values.get("blocked"):
                self.gc_blocked.append(f"{name}: {values['blocked']}")

    def _failed_task(self, task, reason: str) -> None:
        kind, _, name = task.name.partition(":")
        if kind == "thin":
            self.thin_failed[name] = reason
            return
        if kind == "image":
            self.failed.setdefault(name, reason)
        elif kind == "platform":
            self.failed.setdefault(name.rpartition("#")[0], reason)
        users = self.session.ctx.plan.users(task.name) if kind in ("layer", "flat") \
            else (task.meta or {}).get("images", [])
        for image in users:
            self.failed.setdefault(image, reason)
        if kind not in ("image", "platform", "layer", "flat"):
            self.other_failures.append(f"{task.name}: {reason}")
        if self.interactive:
            sys.stderr.write(f"FAILED {task.name}: {reason}\n")

    def add_failure(self, task, fail):
        if isinstance(fail, UnmetDependency):
            if task.name.startswith("image:"):
                self.failed.setdefault(task.name[6:], "a layer, flat image or transaction it "
                                       "needs failed")
            return                       # a consequence: the cause is reported on its own
        self._failed_task(task, _task_reason(fail))

    # -- end ----------------------------------------------------------------------------------

    def complete_run(self):
        session = self.session
        broke = sys.exc_info()[1]       # doit calls this in a finally: what broke its runner
        if broke is not None and not isinstance(broke, Interrupted):    # that one: a signal
            traceback.print_exception(broke)
            self.runtime_errors.append(f"the run broke: {type(broke).__name__}: {broke}")
        try:
            published, errors = session.close_transactions()
            self.published |= published
            self.gc["errors"] += errors
            self._finish()
        finally:
            session.release()
        log.debug("run closed %.2fs after the start", time.monotonic() - session.started)
        self._summary()
        code = self._exit_code()
        session.report(self.record(code))
        if session.exit_at_once:
            leave(code, self.outstream)
        raise SystemExit(code)

    def _finish(self) -> None:
        """Clocks and doit's rows after the publish: a full disk here loses nothing published,
        it leaves the records behind (the next run writes them)."""
        try:
            self.session.finish(self._changed(), self.task_names)
        except (OSError, sqlite3.Error) as exc:
            if isinstance(exc, OSError) and not environmental(exc):
                raise
            why = from_os(exc) if isinstance(exc, OSError) else f"doit's database: {exc}"
            self.runtime_errors.append(f"after the publish: {why}")

    def record(self, code: int) -> dict:
        """What ``status.json`` and the metrics say about this run."""
        states = {"added": 0, "updated": 0}
        for change in self.changes.values():
            states["added" if change == "added" else "updated"] += 1
        counts = {**states, "unchanged": len(self.unchanged), "failed": len(self.failed),
                  "gone": len(self.gone), "layers_ingested": self.built["layer"],
                  "flat_built": self.built["flat"], "bytes_downloaded": self.bytes_downloaded,
                  "gc_deleted": len(self.gc["deleted"]), "gc_pending": len(self.gc["pending"]),
                  "thin_pushed": self.thin_pushed, "thin_failed": len(self.thin_failed),
                  "failures": len(self.failed) + len(self.thin_failed)}
        return {"start": self.began, "end": time.time(),
                "duration_s": round(time.time() - self.began, 3), "exit_code": code,
                "interrupted": self.session.interrupted, "counts": counts,
                "failures": dict(sorted(self.failed.items())),
                "thin_failures": dict(sorted(self.thin_failed.items())),
                "gone": dict(sorted(self.gone.items())),
                "errors": self.session.ctx.recipes.problems + self.other_failures
                + self.gc["errors"] + self.gc_blocked + self.runtime_errors}

    def _exit_code(self) -> int:
        if self.session.worker_died:
            return EXIT_SETUP
        if self.session.interrupted:
            return self.session.exit_signal
        if self.runtime_errors:
            for line in self.runtime_errors:
                sys.stderr.write(f"unpacked: {line}\n")
            return EXIT_SETUP
        if self.failed or self.other_failures or self.thin_failed or self.gc["errors"] \
                or self.gc_blocked or self.session.ctx.recipes.broken:
            return EXIT_FAILED
        return 0

    def _changed(self) -> bool:
        """Did this run change the repository or a registry (then references moved)?"""
        return bool(self.changes or self.built["layer"] or self.built["flat"]
                    or self.thin_pushed or self.gc["deleted"] or self.published)

    def _list(self, label: str, items: list[str]) -> None:
        for line in items[:SHOWN]:
            self.write(f"  {label} {line}\n")
        if len(items) > SHOWN:
            self.write(f"  {label.rstrip(':')}: {len(items) - SHOWN} more\n")

    def _not_offered(self, names: list[str]) -> list[str]:
        """Converted images whose index lacks a platform asked for (not a failure)."""
        by_name = self.session.ctx.plan.by_name()
        out = []
        for name in names:
            resolved = by_name[name][0].resolved if by_name.get(name) else None
            if resolved is not None and resolved.missing:
                out.append(f"{name}: {', '.join(resolved.missing)}")
        return out

    def _summary(self) -> None:
        session = self.session
        added = sorted(n for n, c in self.changes.items() if c == "added")
        updated = sorted(n for n, c in self.changes.items() if c != "added")
        broken = session.ctx.recipes.problems
        gc = self.gc
        something = (added or updated or any(self.built.values()) or self.failed
                     or session.interrupted or self.thin_pushed or self.thin_failed
                     or any(gc.values()) or self.gc_blocked or broken or self.gone
                     or self.other_failures)
        if not (something or self.interactive):
            return
        seconds = time.monotonic() - session.started
        line = (f"unpacked: {len(added)} added, {len(updated)} updated, "
                f"{len(self.unchanged)} unchanged, {len(self.failed)} failed "
                f"({logs.count(self.built['layer'], 'layer')} ingested, "
                f"{logs.count(self.built['flat'], 'flat image')} built) in {seconds:.1f}s")
        if session.worker_died:
            line += f"; {session.worker_died} (out of memory?), transaction aborted"
        elif session.interrupted:
            line += f"; interrupted by {session.interrupted}" + (
                ", transaction aborted" if session.aborted else ", no transaction left open")
        self.write(line + "\n")
        self._list("added", added)
        self._list("updated", updated)
        self._list("platforms not offered:", self._not_offered(added + updated))
        self._list("failed", [f"{n}: {r}" for n, r in sorted(self.failed.items())])
        self._list("gone upstream, kept:", [f"{n}: {r}" for n, r in sorted(self.gone.items())])
        self._list("error", broken + self.other_failures)
        if any(gc.values()) or self.gc_blocked:
            self.write(f"gc: {len(gc['deleted'])} deleted, {len(gc['pending'])} pending, "
                       f"{len(gc['errors'])} failed\n")
            self._list("deleted", gc["deleted"])
            self._list("pending", gc["pending"])
            self._list("failed", gc["errors"])
            self._list("held", self.gc_blocked)
        if self.thin_pushed or self.thin_failed:
            self.write(f"thin images: {self.thin_pushed} pushed, {len(self.thin_failed)} "
                       "failed\n")
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.thin_failed.items():
                by_reason.setdefault(reason, []).append(name)
            for reason, names in sorted(by_reason.items()):
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                self.write(f"  failed thin {sorted(names)[0]}{more}: {reason}\n")

