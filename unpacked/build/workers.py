"""The processes a parallel run's actions execute in, forked at its start while it is small.

doit's own process runner forks its workers when the tasks start, from a main process that
by then holds the plan and every task object; the main process keeps touching those pages
while it dispatches, so each worker ends up with its own copy (a cold convert of ten
thousand images reached 1.4 GiB in three processes). Here doit runs its tasks in threads
(``par_type: thread``) and each ``@remote`` action hands its work to one of these workers,
forked before the resolve: they inherit the settings and recipes, never the plan or the
tasks, and answer from the cache on disk (``Context(worker=True)``).

The workers are ``multiprocessing`` children of the run: the session notices one that dies
(the run ends as interrupted), ends them before it closes a transaction (waiting for one
inside a publish), and they die with the run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import multiprocessing
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from sys import intern
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import Context


# What the actions import, imported before the fork: one copy in memory for every process
# of the run instead of one each (the run's resolve needs the registry client anyway)
PRELOAD = ("unpacked.registry.client", "unpacked.image.convert", "unpacked.image.thin")


class WorkerDied(RuntimeError):
    """The worker running an action ended before it answered (killed, out of memory)."""


class RemoteError(RuntimeError):
    """An action raised an unexpected exception in a worker; carries the worker's traceback."""


class Workers:
    """A fixed set of forked processes, each running one action at a time for a doit thread."""

    def __init__(self, ctx: Context, count: int,
                 died: Callable[[int | None], None] = lambda exitcode: None):
        fork = multiprocessing.get_context("fork")
        self.owner = os.getpid()
        self.died = died                # told a dead worker's exit code before its action fails
        self.stopped = False
        self.free: queue.Queue[tuple[multiprocessing.Process, Connection]] = queue.Queue()
        self.processes: list[multiprocessing.Process] = []
        ours: list[Connection] = []
        for module in PRELOAD:
            importlib.import_module(module)
        gc.freeze()
        for number in range(count):
            mine, theirs = fork.Pipe()
            ours.append(mine)
            # each worker closes the run's ends of every pipe it inherits: it sees the run go
            process = fork.Process(target=_serve, name=f"unpacked-worker-{number + 1}",
                                   args=(theirs, list(ours), ctx.settings, ctx.recipes,
                                         ctx.writable),
                                   daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.free.put((process, mine))

    def call(self, action: Callable, args: tuple) -> Any:
        """``action(<the worker's Context>, *args)`` in a free worker; its result or error."""
        if self.stopped:
            raise WorkerDied(f"the run is ending; {action.__name__} not run")
        process, conn = self.free.get()
        alive = True
        try:
            conn.send((action, args))
            ok, answer = conn.recv()
        except (EOFError, OSError):
            alive = False
            process.join(5)
            code = process.exitcode
            self.died(code)
            raise WorkerDied(f"{process.name} ended while running {action.__name__}"
                             + (f" (exit code {code})" if code is not None else "")) from None
        finally:
            if alive:
                self.free.put((process, conn))
        if ok:
            return answer
        raise RemoteError(answer)

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the idle workers to end, and wait for them; a busy one is left to the caller
        (it may be publishing). No action is handed out after this."""
        self.stopped = True
        gc.unfreeze()                       # nothing is forked from here any more
        told = []
        while True:
            try:
                process, conn = self.free.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(OSError):
                conn.send(None)
            told.append(process)
        for process in told:
            process.join(timeout)


def _serve(conn: Connection, inherited: list[Connection], settings, recipes,
           writable: bool) -> None:
    """A worker's loop: run what it is sent until told to stop or its run is gone."""
    from ..repo.layout import hex_of
    from .context import Context
    for other in inherited:
        other.close()
    ctx = Context(settings, recipes, writable, worker=True)
    while True:
        # the digests of the job before (or the run's, inherited), kept for nothing: ~12 MiB
        # a worker at 10,000 images
        hex_of.cache_clear()
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        action, args = job
        try:
            answer = (True, action(ctx, *args))
        except Exception:                           # a bug: the run reports its traceback
            answer = (False, traceback.format_exc())
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send((False, traceback.format_exc()))


def remote(action: Callable) -> Callable:
    """Run ``action(ctx, ...)`` in one of the run's workers when it has them (a parallel
    run), else here (a serial run; a process doit forked itself, with ``-P process``). The
    action and its arguments cross a pipe: module-level, picklable."""
    @functools.wraps(action)
    def run(ctx: Context, *args):
        workers = ctx.workers
        if workers is None or workers.owner != os.getpid():    # not the run's main process
            return action(ctx, *args)
        return shared(workers.call(run, args))
    return run


def shared(values):
    """An action's values as the run keeps them to its end (doit's records): each name and
    short text (a digest, the recipe set) one object however many tasks hold it, not a
    fresh copy from the pipe for each (~12 MiB at ten thousand images)."""
    if type(values) is not dict:
        return values
    return {intern(k) if type(k) is str else k:
            intern(v) if type(v) is str and len(v) <= 256 else v for k, v in values.items()}
