"""doit glue: the run's lock, its one transaction per repository, signals, output, exit code.

All of it hangs on a reporter, because doit calls its hooks in the main process only, at the
start (``initialize``) and at the very end of a run (``complete_run``), whatever the mode of
execution and even after an interrupt: that is where the run lock is taken, a crashed run's
transaction aborted, and this run's transaction published (or aborted when interrupted).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from .. import log as logs
from ..errors import RecipeError, UnpackedError
from ..settings import Settings

log = logging.getLogger("unpacked.run")

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_BUSY = 0, 1, 3, 75
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(KeyboardInterrupt):
    """Raised in the main process by SIGINT/SIGTERM so that doit unwinds and we abort."""


class RunLock:
    """One run at a time: a non-blocking ``flock`` on ``cache/run.lock``."""

    def __init__(self, path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _task_reason(fail) -> str:
    text = fail.get_msg() if hasattr(fail, "get_msg") else str(fail)
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(fail).__name__


class Reporter(ConsoleReporter):
    """Quiet in cron, a line per task for a person, a summary and a meaningful exit code."""

    desc = "unpacked: lock, transactions, summary"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        from .plan import current_settings
        self.settings: Settings = current_settings()
        self.run = RUN
        self.started = RUN.started if RUN else time.monotonic()
        self.interactive = logs.interactive()
        self.changes: dict[str, str] = {}
        self.unchanged: set[str] = set()
        self.failed: dict[str, str] = {}
        self.task_failures: dict[str, str] = {}
        self.built: dict[str, int] = {"layer": 0, "flat": 0}
        self.thin_pushed = 0
        self.thin_failed: dict[str, str] = {}
        self.gc: dict[str, list[str]] = {"deleted": [], "pending": [], "errors": []}
        self.task_names: set[str] = set()
        self.published = False

    # -- start --------------------------------------------------------------------------------

    def initialize(self, tasks, selected_tasks):
        if self.run is None:      # doit run programmatically without prepare_run: do it now
            self.run = prepare_run(self.settings, resolve=False)
        self.task_names = set(tasks)

    @property
    def interrupted(self) -> str | None:
        return self.run.interrupted if self.run else None

    # -- per task -----------------------------------------------------------------------------

    def execute_task(self, task):
        if task.name.startswith(("layer:", "flat:", "image:", "publish:")) and self.interactive:
            self.write(f".  {task.name}\n")

    def skip_uptodate(self, task):
        if task.name.startswith("image:"):
            self.unchanged.add(task.name[6:])

    def add_success(self, task):
        values = task.values or {}
        if values.get("failed"):
            self._failed_task(task, values["failed"])
        elif task.name.startswith("image:"):
            self.changes[task.name[6:]] = values.get("change") or "rewritten"
        elif task.name.startswith(("layer:", "flat:")):
            self.built[task.name.partition(":")[0]] += 1
        elif task.name.startswith("thin:"):
            self.thin_pushed += len(values.get("pushed") or [])
        elif task.name.startswith("publish:"):
            self.published = True
            for error in values.get("errors") or []:
                self.task_failures[f"{task.name}:{len(self.task_failures)}"] = error
                self.gc["errors"].append(error)
        elif task.name.startswith("gc:"):
            self.gc["deleted"] += values.get("deleted") or []
            self.gc["pending"] += values.get("pending") or []
            for error in values.get("errors") or []:
                self.task_failures[f"{task.name}:{len(self.task_failures)}"] = error
                self.gc["errors"].append(error)

    def _failed_task(self, task, reason: str) -> None:
        self.task_failures[task.name] = reason
        if task.name.startswith("thin:"):
            self.thin_failed[task.name[5:]] = reason
            return
        meta = task.meta or {}
        if task.name.startswith("image:"):
            self.failed.setdefault(task.name[6:], reason)
        for image in meta.get("images", []):
            self.failed.setdefault(image, reason)
        if self.interactive:
            sys.stderr.write(f"FAILED {task.name}: {reason}\n")

    def add_failure(self, task, fail):
        if isinstance(fail, UnmetDependency):
            if task.name.startswith("image:"):
                self.failed.setdefault(task.name[6:], "a layer or flat image it needs failed")
            return                       # a consequence: the cause is reported on its own
        self._failed_task(task, _task_reason(fail))

    # -- end ----------------------------------------------------------------------------------

    def complete_run(self):
        try:
            self._close_transactions()
            if not self.interrupted:
                if self._changed():
                    start_gc_clocks(self.settings, end=True)   # what it unreferenced
                if self.settings.gc:
                    prune_task_rows(self.settings, self.task_names)
        finally:
            self.run.lock.release()
        self._summary()
        if self.interrupted:
            raise SystemExit(EXIT_SIGNAL.get(self.interrupted, 130))
        if self.runtime_errors:
            for line in self.runtime_errors:
                sys.stderr.write(f"unpacked: {line}\n")
            raise SystemExit(EXIT_SETUP)
        if self.failed or self.task_failures or self.thin_failed:
            raise SystemExit(EXIT_FAILED)

    def _changed(self) -> bool:
        """Did this run change the repository or a registry (then references moved)?"""
        return bool(self.changes or self.built["layer"] or self.built["flat"]
                    or self.thin_pushed or self.gc["deleted"] or self.published)

    def _close_transactions(self) -> None:
        from .actions import run_message
        for publisher in publishers(self.settings):
            if not publisher.is_open():
                continue
            try:
                if self.interrupted:
                    publisher.abort()
                else:
                    publisher.publish(run_message(self.settings, publisher.name))
                    self.published = True
                    for error in publisher.leftovers:
                        self.task_failures[f"publish:{len(self.task_failures)}"] = error
                        self.gc["errors"].append(error)
            except UnpackedError as exc:
                sys.stderr.write(f"unpacked: {exc}\n")
                self.task_failures[f"publish:{publisher.name}"] = str(exc)

    def _summary(self) -> None:
        added = sum(1 for c in self.changes.values() if c == "added")
        updated = sum(1 for c in self.changes.values() if c != "added")
        seconds = time.monotonic() - self.started
        built = self.built["layer"] + self.built["flat"]
        gc = self.gc
        something = (added or updated or built or self.failed or self.interrupted
                     or self.thin_pushed or self.thin_failed or any(gc.values()))
        if not (something or self.interactive):
            return
        line = (f"unpacked: {added} added, {updated} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.failed)} failed ({self.built['layer']} layers ingested, "
                f"{self.built['flat']} flat images built) in {seconds:.1f}s")
        if self.interrupted:
            line += f"; interrupted by {self.interrupted}, transaction aborted"
        self.write(line + "\n")
        for name, reason in sorted(self.failed.items()):
            self.write(f"  failed {name}: {reason}\n")
        if any(gc.values()):
            self.write(f"gc: {len(gc['deleted'])} deleted, {len(gc['pending'])} pending, "
                       f"{len(gc['errors'])} failed\n")
            for line in gc["deleted"][:20]:
                self.write(f"  deleted {line}\n")
            if len(gc["deleted"]) > 20:
                self.write(f"  deleted: {len(gc['deleted']) - 20} more\n")
            for line in gc["pending"][:10]:
                self.write(f"  pending {line}\n")
            if len(gc["pending"]) > 10:
                self.write(f"  pending: {len(gc['pending']) - 10} more\n")
            for line in gc["errors"]:
                self.write(f"  failed {line}\n")
        if self.thin_pushed or self.thin_failed:
            self.write(f"thin images: {self.thin_pushed} pushed, {len(self.thin_failed)} failed\n")
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.thin_failed.items():
                by_reason.setdefault(reason, []).append(name)
            for reason, names in sorted(by_reason.items()):
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                self.write(f"  failed thin {sorted(names)[0]}{more}: {reason}\n")


class Run:
    """What a ``doit`` run holds from its start to its end: the lock and how it ends."""

    def __init__(self, lock: RunLock):
        self.lock = lock
        self.started = time.monotonic()
        self.interrupted: str | None = None

    def on_signal(self, signum, frame):
        self.interrupted = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_IGN)      # a second signal must not cut the abort
        raise Interrupted(self.interrupted)


RUN: Run | None = None


def publishers(settings: Settings):
    from .context import context
    from .plan import recipes_or_none
    ctx = context(settings)
    repos = sorted({x.cvmfs_repo for x in recipes_or_none(settings)})
    return [ctx.publisher(r) for r in repos]


DOIT_COMMANDS = {"list", "info", "forget", "clean", "dumpdb", "help", "ignore", "reset-dep",
                 "strace", "tabcompletion", "auto", "version"}


def is_run(argv: list[str]) -> bool:
    """doit's own rule: the first argument names a command, else the command is ``run``."""
    args = argv[1:]
    if not args:
        return True
    if args[0] in ("--version", "--help", "-h"):
        return False
    return args[0] == "run" or args[0] not in DOIT_COMMANDS


def prepare_run(settings: Settings, resolve: bool = True) -> Run:
    """Start of a run: take the lock, abort a crashed run's transaction, resolve (network).

    An overlapping run exits here with EXIT_BUSY, before it has changed anything.
    """
    global RUN
    lock = RunLock(settings.cache_dir / "run.lock")
    if not lock.acquire():
        sys.stderr.write(f"unpacked: another run (pid {lock.holder()}) holds {lock.path}; "
                         "exiting without changes\n")
        raise SystemExit(EXIT_BUSY)
    run = Run(lock)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, run.on_signal)
    check_push_credentials(settings)
    try:
        for publisher in publishers(settings):
            publisher.recover()
        if resolve:
            from .actions import run_resolve
            run_resolve(settings)
            start_gc_clocks(settings)
    except UnpackedError as exc:
        sys.stderr.write(f"unpacked: {exc}\n")
        lock.release()
        raise SystemExit(EXIT_BUSY) from None
    except Interrupted:
        lock.release()
        sys.stderr.write(f"unpacked: interrupted by {run.interrupted} while resolving\n")
        raise SystemExit(EXIT_SIGNAL.get(run.interrupted, 130)) from None
    RUN = run
    return run


def start_gc_clocks(settings: Settings, end: bool = False) -> None:
    """Record, for each repository, what lost its last reference; at the start of a run also
    say what is gone upstream."""
    from .plan import current_plan, gc_plan, recorded_tasks
    plan = current_plan()
    if end:
        plan.recorded = recorded_tasks(settings)    # what this run just recorded (thin pushes)
    for repo in plan.repos:
        result = gc_plan(plan, repo, save=True)
        for name in () if end else result.gone:
            log.warning("%s: %s is gone upstream; kept (gc_prune_gone=1 removes it)", repo, name)


def prune_task_rows(settings: Settings, names: set[str]) -> int:
    """Delete doit's rows of tasks that no longer exist (doit never does)."""
    import sqlite3
    path = settings.cache_dir / "doit.sqlite"
    if not path.exists() or not names:
        return 0
    with sqlite3.connect(path) as db:
        stale = [r[0] for r in db.execute("select task_id from doit") if r[0] not in names]
        db.executemany("delete from doit where task_id = ?", [(n,) for n in stale])
    return len(stale)


def check_push_credentials(settings: Settings) -> None:
    """Say once, at the start, when a recipe pushes thin images with no credentials at all."""
    from ..image.thin import PASSWORD_ENV, password
    from ..recipe import load
    from ..reference import parse
    from ..registry.auth import find_credential
    for recipe in load(settings.recipe_path):
        if not recipe.output_format or not recipe.inputs:
            continue
        host = parse(recipe.output_of(recipe.inputs[0].ref)).api_host
        if (recipe.user and password()) or find_credential(host):
            continue
        log.warning("%s: thin images go to %s but no credentials are set (%s for user %s, or "
                    "a Docker config entry for %s); pushes will be tried anonymously",
                    recipe.path, host, PASSWORD_ENV, recipe.user, host)


def doit_config(settings: Settings) -> dict:
    """DOIT_CONFIG for dodo.py: sqlite3 state in cache/, our reporter, keep going on failures."""
    jobs = settings.jobs or default_jobs()
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return {
        "backend": "sqlite3",
        "dep_file": str(settings.cache_dir / "doit.sqlite"),
        "default_tasks": ["publish", "thin"],
        "reporter": Reporter,
        "continue": True,
        "num_process": jobs if jobs > 1 else 0,
        "par_type": "process",
        "verbosity": 2,
        "forget_disable_default": True,
        "minversion": "0.36.0",
    }


def default_jobs() -> int:
    """Parallel processes when not set: measured in bench/ (ingest is CPU-bound per layer)."""
    return min(2, os.cpu_count() or 1)


def check_recipes(settings: Settings) -> None:
    """Fail at load with file:line:key errors rather than a traceback from inside doit."""
    from ..recipe import load
    try:
        load(settings.recipe_path)
    except RecipeError as exc:
        for line in exc.lines:
            sys.stderr.write(f"error: {line}\n")
        raise SystemExit(EXIT_SETUP) from None
