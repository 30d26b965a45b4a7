"""A ``doit`` run from its start to its end, in the main process.

Start: take the locks (``cache/`` and every repository), install the signal handlers, finish
or abort what a crashed run left, and resolve every input over the network. This is the only
network step, and it happens before doit asks for tasks (in dodo.py's import, for a run only):
doit's delayed task creation cannot express "all tasks after the resolve" across generators,
and with the network first every task is static, so ``doit list``/``info``/``forget`` stay
offline. End: publish (or abort when interrupted) what this run opened, restart the GC
clocks, prune doit's rows of vanished tasks, release the locks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.process
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from ..errors import EXIT_SIGNAL, UnpackedError, environmental, from_os
from ..repo.lock import Lock
from . import doit_private, notify
from .context import Context, die_with_parent, parallel_jobs
from .refresh import Refresher
from .status import record_run, write_metrics
from .tasks import Tasks
from .workers import Workers

log = logging.getLogger("unpacked.run")


def leave(code: int, *streams) -> NoReturn:
    """End the process with ``code`` now, everything said (``streams``, stdout and stderr
    flushed; a reader gone is no error) and written: the interpreter's
    teardown would free the run's objects one by one, a second at ten thousand images
    (a third of a second at three thousand, measured), for a process that is ending anyway.
    Locks, workers, transactions and the records are closed by then; only ``doit`` run from
    the command line ends so, never a caller that runs doit in its own process."""
    logging.shutdown()
    for stream in (*streams, sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


class Interrupted(KeyboardInterrupt):
    """Raised in the main process by SIGINT/SIGTERM so that doit unwinds and we abort."""


def _ignore(signum, frame) -> None:
    """The handler of a signal after the first: the run is already ending."""


class Session:
    def __init__(self, ctx: Context, full: bool, wait: float = 0.0, jobs: int | None = None,
                 make_tasks: Callable[[], Tasks] | None = None):
        self.ctx = ctx
        self.make_tasks = make_tasks or (lambda: Tasks(ctx, collect=False))
        self._tasks: Tasks | None = None    # made while the resolve ran (see ``prepare``)
        self._clocks: dict | None = None    # ... and the GC clocks worked out then
        self._prepared_at = -1              # the state's writes when they were
        # doit's num_process (``-n``, else the setting): as many worker processes; 0, none
        # (the tasks run one by one in this process)
        self.jobs = parallel_jobs(ctx.settings) if jobs is None else jobs
        self.wait = wait                # seconds to wait for a lock another run holds
        self.full = full                # no task named on the command line: GC, row pruning
        self.started = time.monotonic()
        self.interrupted: str | None = None
        self.repos = list(ctx.recipes.repos)     # fixed now: an edit mid-run changes nothing
        self.locks: list[Lock] = []
        self.problems: list[str] = []   # resolve problems to report at the end
        self.failed_resolves = 0
        self.worker_died = ""
        self.closing = False            # the run is ending its workers itself
        self.aborted: list[str] = []    # repositories whose transaction an interrupt aborted
        self.idle_images: Callable[[], set[str]] = set   # images doit has no reason to visit
        self.omitted_tasks: Callable[[], set[str]] = set  # up to date, so not made (bare run)
        self.exit_at_once = False       # the process ends with the run (``leave``)

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        notify.emit(self.ctx.settings.notification_file, "start_ducc")
        try:
            self._lock(Lock(self.ctx.settings.cache_dir / "run.lock", "this cache"))
            for repo in self.repos:
                self._lock(self.ctx.publisher(repo).lock())
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.on_signal)
            multiprocessing.util.register_after_fork(self, Session.in_worker)
            if self.jobs > 0:           # forked now, while this process is small
                self.ctx.workers = Workers(self.ctx, self.jobs, died=self.worker_gone)
                log.debug("%d worker processes started", self.jobs)
            threading.Thread(target=self.watch_workers, daemon=True).start()
            for repo in self.repos:
                self.ctx.publisher(repo).recover()
            self.refresh()
            if self._tasks is None or self.ctx.state.writes != self._prepared_at:
                log.debug("the resolve changed the state: planning again")
                self._tasks = self._clocks = None
                self.prepare()
            self.record_clocks(self._clocks, warn_gone=True)
            self._clocks = None
        except BaseException:
            self.release()
            raise

    def prepare(self) -> None:
        """The plan, the GC clocks and every task's state, from the state as it is now. Done
        while the resolve's threads wait for the registries, and again after it only when
        the resolve changed the state (a no-op run changes nothing: 10,000 images, 0.5 s
        less, measured; the HEADs slow a little, as both share the machine's cores)."""
        mark, state = time.monotonic(), self.ctx.state
        self._prepared_at = state.writes
        steps = (self.ctx.replan, self._prepare_clocks, self._prepare_tasks)
        for step in steps:
            if state.writes != self._prepared_at:
                self._clocks = self._tasks = None   # stale already: stop, free what it holds
                return
            step()
        log.debug("planned in %.2fs", time.monotonic() - mark)

    def _prepare_clocks(self) -> None:
        self._clocks = self.work_out_clocks()

    def _prepare_tasks(self) -> None:
        self._tasks = self.make_tasks()
        self._tasks.prepare(stale=lambda: self.ctx.state.writes != self._prepared_at)

    def tasks(self) -> Tasks:
        """The run's tasks (those prepared, handed over once)."""
        tasks, self._tasks = self._tasks, None
        return tasks if tasks is not None else self.make_tasks()

    def _lock(self, lock: Lock) -> None:
        lock.acquire(self.wait)
        self.locks.append(lock)

    def in_worker(self) -> None:
        """In a forked worker: the locks are the run's, not the worker's (an orphaned worker
        must not keep later runs out); the run's signal handler is not the worker's (the run's
        terminate() must end it); and the worker dies with the run."""
        for lock in self.locks:
            lock.forget()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent()

    def watch_workers(self) -> None:
        """A worker that died (the OOM killer, a kill -9) ends the run as an interrupted one
        (its transaction aborted, the locks freed): noticed here when it was idle, or when
        doit forked its own workers (``-P process``), which doit would wait for forever."""
        seen: dict[int, multiprocessing.Process] = {}
        while not self.interrupted and not self.closing:
            # the set itself: active_children() would reap a worker that died between two
            # looks before this loop saw it
            for child in list(multiprocessing.process._children):
                seen.setdefault(child.pid, child)
            for pid, child in list(seen.items()):
                if child.exitcode is None:
                    continue
                del seen[pid]
                if child.exitcode < 0:
                    self.worker_gone(child.exitcode)
            time.sleep(0.2)

    def worker_gone(self, exitcode: int | None) -> None:
        """A worker died: end the run as an interrupted one, unless an interrupt the run is
        handling killed it too (a Ctrl-C reaches the whole process group), or the run is
        ending its workers itself."""
        if exitcode in (-signal.SIGINT, -signal.SIGTERM):
            time.sleep(1.0)             # let the run see its own signal first
        if self.interrupted or self.worker_died or self.closing:
            return
        how = "" if exitcode is None else f" (signal {-exitcode})" if exitcode < 0 \
            else f" (exit code {exitcode})"
        self.worker_died = f"a worker process died{how}"
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def stop_workers(self) -> None:
        """End the run's worker processes before its transactions are closed: the idle ones
        are told to; one still busy (an interrupt, or an error that cut the run short) is
        terminated. A worker inside ``cvmfs_server transaction`` or ``publish`` defers the
        signal; it is waited for however long that takes, never killed: a cut publish damages
        the repository."""
        self.closing = True
        if self.ctx.workers is not None:
            self.ctx.workers.stop()
        # a copy first: is_alive() drops an ended child from the very set being walked
        children = [c for c in list(multiprocessing.process._children) if c.is_alive()]
        for child in children:
            child.terminate()
        said = False
        for child in children:
            child.join(timeout=10)
            while child.exitcode is None and child.pid in self._closing():
                if not said:
                    log.warning("waiting for a publish under way in a worker to finish")
                    said = True
                child.join(timeout=1)
            if child.exitcode is None:
                child.kill()
                child.join(timeout=10)

    def _closing(self) -> set[int]:
        """The processes opening or publishing a transaction of this run right now."""
        return {pid for repo in self.repos if (pid := self.ctx.publisher(repo).closing())}

    def on_signal(self, signum, frame) -> None:
        self.interrupted = signal.Signals(signum).name
        # a second signal must not cut the abort; a Python handler that does nothing, not
        # SIG_IGN: a signal already caught would then raise "ignored due to race condition"
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignore)
        raise Interrupted(self.interrupted)

    @property
    def exit_signal(self) -> int:
        return EXIT_SIGNAL.get(self.interrupted or "", 130)

    def refresh(self) -> None:
        """Resolve every input over the network; failures are kept per image for its task."""
        ctx = self.ctx
        started = time.monotonic()
        log.debug("resolving %.2fs after the start", started - self.started)
        refresher = Refresher(ctx.client, ctx.state, ctx.settings.registry_jobs)
        outcomes, problems = refresher.run(ctx.recipes.recipes, ctx.platforms_of,
                                           meanwhile=self.prepare)
        ctx.client.close()      # its connections: not held through the run, nor forked
        for line in problems:
            log.warning("%s", line)
        self.problems = problems
        failed = [o for o in outcomes if o.error]
        self.failed_resolves = len(failed)
        changed = sum(1 for o in outcomes if o.changed)
        for o in outcomes:
            if o.resolved is not None and o.resolved.missing and o.changed:
                log.warning("%s: not offered for %s (offers what was converted: %s)",
                            o.wanted.name, ", ".join(o.resolved.missing),
                            ", ".join(i.platform for i in o.resolved.images))
        log.info("resolved %d images in %.1fs: %d changed, %d failed", len(outcomes),
                 time.monotonic() - started, changed, len(failed))

    def work_out_clocks(self) -> dict:
        """Each repository's garbage collection from the plan: (clocks file, its clocks
        updated, the collection), nothing saved yet."""
        from ..repo import gc
        from .plan import collection, gc_wants
        worked = {}
        for repo in self.repos:
            clocks_file = gc.Clocks(self.ctx.settings.cache_dir, repo)
            clocks = clocks_file.load()
            worked[repo] = (clocks_file, clocks, collection(
                self.ctx, gc_wants(self.ctx, self.ctx.plan, repo), repo, clocks, remember=True))
        return worked

    def record_clocks(self, worked: dict | None = None, warn_gone: bool = False) -> None:
        """Record, for each repository, what lost its last reference (GC clocks)."""
        if worked is None:
            worked = self.work_out_clocks()
        for repo, (clocks_file, clocks, result) in worked.items():
            clocks_file.save(clocks)
            self.ctx.collections[repo] = result
            for name in result.gone if warn_gone else ():
                log.warning("%s: %s is gone upstream; kept (gc_prune_gone=1 removes it)", repo,
                            name)

    # -- end ----------------------------------------------------------------------------------

    def close_transactions(self) -> tuple[bool, list[str]]:
        """Publish (or abort, when interrupted) what is still open; (published?, errors)."""
        from .actions import run_message
        published, errors = False, []
        self.stop_workers()             # nothing may write while the transactions close
        for repo in self.repos:
            publisher = self.ctx.publisher(repo)
            if not publisher.is_open():
                continue
            try:
                if self.interrupted:
                    publisher.abort()
                    self.aborted.append(repo)
                else:
                    errors += publisher.publish(run_message(self.ctx, repo))
                    published = True
            except UnpackedError as exc:
                errors.append(str(exc))
            except OSError as exc:          # the spool full or read-only: the next run mends
                if not environmental(exc):
                    raise
                step = "abort" if self.interrupted else "publish"
                errors.append(f"{repo}: {step} failed, left to the next run: {from_os(exc)}")
        return published, errors

    def finish(self, changed: bool, task_names: set[str]) -> None:
        """After the tasks: clocks of what this run unreferenced, doit's stale rows."""
        if self.interrupted:
            return
        if changed:
            self.ctx.replan()
            self.record_clocks()
        if self.full and task_names and not self.ctx.recipes.broken:
            doit_private.prune(self.ctx.settings.cache_dir / "doit.sqlite",
                               task_names | self.omitted_tasks(), self.ctx.recipe_set_id,
                               self.ctx.plan.recorded)

    def report(self, record: dict) -> None:
        """status.json, the metrics file and DUCC's end notification (never fatal)."""
        s = self.ctx.settings
        if not os.access(s.cache_dir, os.W_OK):
            return              # another user's cache (its run said why it could not start)
        record["repositories"] = {repo: {"revision": self.ctx.publisher(repo).revision()}
                                  for repo in self.repos}
        try:
            status = record_run(s.cache_dir, record, self.full)
            if s.metrics_file:
                write_metrics(s.metrics_file, status)
        except OSError as exc:
            log.warning("status not written: %s", exc.strerror or exc)
        notify.emit(s.notification_file, "end_ducc", time_elapsed_s=record["duration_s"],
                    status="ok" if record["exit_code"] == 0 else "error")

    def release(self) -> None:
        self.closing = True
        if self.ctx.workers is not None:
            self.ctx.workers.stop()         # no action runs here after this: they fail
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()
