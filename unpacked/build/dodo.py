"""What ``dodo.py`` exports: DOIT_CONFIG and the task generators of this invocation.

One handler here turns every error a user can act on into its line(s) and its exit code,
before doit starts; inside the run the reporter does. Importing for ``doit list``/``info``/
``forget`` takes no lock, installs no signal handler and touches no network; a ``doit`` run
starts its ``Session`` here (see session.py for why the resolve step is at import).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from .. import log as logs
from .. import settings as settings_mod
from ..errors import EXIT_SIGNAL, RecipeError, UnpackedError, environmental, from_os
from . import doit_private
from .context import Context, parallel_jobs
from .reporter import Reporter
from .session import Interrupted, Session
from .tasks import Tasks

FORGET = """\
doit forget needs to be told what to forget (it changes no file; the next run redoes it):
  doit forget layer:<hex>       the layer is downloaded and unpacked again
  doit forget flat:<hex>        the flat image is built again
  doit forget image:<name>      the image is flattened and linked again
  doit forget thin:<name>       the thin image is pushed again
  doit forget --all             everything: every layer is ingested again
`doit list --all` names the tasks.
"""


def fail(exc: UnpackedError) -> SystemExit:
    for line in exc.messages():
        sys.stderr.write(f"unpacked: {line}\n")
    return SystemExit(exc.exit_code)


def load(argv: list[str] | None = None) -> dict:
    """The namespace dodo.py exports for this invocation of doit."""
    argv = sys.argv if argv is None else argv
    call = doit_private.invocation(argv)
    command, options = call.command, call.options
    tune_gc()
    if command == "forget" and not call.tasks and not options.get("forget_all"):
        sys.stdout.write(FORGET)
        raise SystemExit(0)
    session = None
    try:
        variables = doit_private.command_line_variables()
        settings = settings_mod.load(variables, project=Path.cwd())
        logs.setup(settings.verbosity)
        if not settings.cache_dir.is_dir():
            settings.cache_dir.mkdir(parents=True, exist_ok=True)
        ctx = Context(settings)
        ctx.keep_recipes = command == "run"
        if ctx.recipes.problems and not ctx.recipes.recipes:
            raise RecipeError(ctx.recipes.problems)     # nothing at all to work from
        for line in ctx.recipes.problems if command != "run" else ():
            sys.stderr.write(f"unpacked: {line}\n")
        full = command == "run" and not call.tasks and "recipes" not in variables
        listing = command == "list" and not call.tasks and \
            not (options.get("subtasks") or options.get("private"))
        # edges to up-to-date tasks are left out only where nothing follows them: a run
        # that executes just what is due (forget -s, info, list and -a walk them)
        pruned = command == "run" and not options.get("always")

        def make_tasks() -> Tasks:
            return Tasks(ctx, explain=command == "info", collect=full and settings.gc,
                         all_edges=not pruned, groups_only=listing,
                         status=command != "list" or bool(options.get("status")),
                         due_only=pruned and not call.tasks)

        if command == "run":
            session = Session(ctx, full, jobs=jobs_of(call, settings), make_tasks=make_tasks)
            session.exit_at_once = True     # the command line's one run of this process
            session.start()
        tasks = session.tasks() if session is not None else make_tasks()
        if session is not None:
            session.idle_images = lambda: tasks.idle_images
            session.omitted_tasks = lambda: tasks.omitted
        return {"DOIT_CONFIG": doit_config(ctx, session), **tasks.namespace()}
    except Interrupted:
        sys.stderr.write(f"unpacked: interrupted by {session.interrupted} while starting\n")
        code = EXIT_SIGNAL.get(session.interrupted or "", 130)
        _record_start_failure(session, code, "interrupted while starting")
        raise SystemExit(code) from None
    except UnpackedError as exc:
        _record_start_failure(session, exc.exit_code, str(exc))
        raise fail(exc) from None
    except OSError as exc:          # cache/ full, read-only, not ours: the machine's state
        if not environmental(exc):
            raise
        error = from_os(exc)
        _record_start_failure(session, error.exit_code, str(error))
        raise fail(error) from None


def _record_start_failure(session: Session | None, code: int, message: str) -> None:
    """A run that ended before its tasks still says so in status.json and the metrics."""
    if session is None:
        return
    now = time.time()
    session.report({"start": now, "end": now, "duration_s": 0.0, "exit_code": code,
                    "counts": {}, "failures": {}, "errors": message.splitlines()})


def tune_gc() -> None:
    """Collect cycles less often: a run makes a few hundred thousand long-lived objects (the
    plan, doit's tasks), and with Python's default thresholds every collection of the
    oldest generation walks all of them again (measured: half the time of making the tasks
    of ten thousand images). Cycles are still collected."""
    gc.set_threshold(100_000, 50, 1000)


def doit_config(ctx: Context, session: Session | None) -> dict:
    """DOIT_CONFIG: sqlite3 state in cache/, our reporter, keep going on failures; tasks run
    in threads that hand the actions to the session's worker processes (workers.py)."""
    s = ctx.settings
    jobs = session.jobs if session is not None else parallel_jobs(s)
    config = {
        "backend": "sqlite3",
        "dep_file": str(s.cache_dir / "doit.sqlite"),
        "default_tasks": ["publish", "thin"],
        "continue": True,
        "num_process": jobs,
        "par_type": "thread",
        "verbosity": 2,
        "forget_disable_default": True,
        "minversion": "0.36.0",
    }
    if session is not None:
        config["reporter"] = Reporter(session)
        doit_private.lean_run()
    return config


def jobs_of(call: doit_private.Invocation, settings: settings_mod.Settings) -> int:
    """doit's ``num_process`` for this run: ``-n N`` on the command line, else the ``jobs``
    setting's (the session starts as many worker processes)."""
    if "num_process" in call.given:
        return max(0, int(call.options.get("num_process") or 0))
    return parallel_jobs(settings)
