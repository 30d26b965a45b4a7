"""The worker processes of a parallel run: forked before the plan, each running what a doit
thread hands it; and a run whose workers die (the OOM killer, a kill -9) ends and says so,
and nothing it leaves behind (its transaction, its workers) blocks the next run."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
from helpers import unique
from helpers.images import Entry
from helpers.pipeline import push, temps, wait_for
from helpers.site import Site

from unpacked.build.state import State
from unpacked.build.workers import RemoteError, WorkerDied, Workers, remote


def _plans() -> int:
    import gc

    from unpacked.build.plan import Plan
    gc.collect()
    return sum(isinstance(o, Plan) for o in gc.get_objects())


@remote
def _look(ctx, name: str) -> dict:
    """In a worker: what it reads of the cache, and what it holds."""
    return {"tags": ctx.state.tags(name), "whole": ctx.state._memo is not None,
            "plans": _plans(), "pid": os.getpid(), "worker": ctx.worker,
            "frozen": gc.get_freeze_count()}


@remote
def _folder_names(ctx, digests: list[str]) -> tuple[int, int]:
    """In a worker: the names of ``digests``; how many names it held before and after."""
    from unpacked.repo.layout import hex_of
    before = hex_of.cache_info().currsize
    for digest in digests:
        hex_of(digest)
    return before, hex_of.cache_info().currsize


@remote
def _values(ctx, digest: str) -> dict:
    return {"digest": digest, "set": "f" * 64}


@remote
def _write(ctx, name: str, tags: list[str]) -> None:
    ctx.state.put_tags(name, tags)


@remote
def _bug(ctx) -> None:
    raise ValueError("a bug in an action")


@remote
def _die(ctx) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def pool(tmp_path):
    from unpacked.build.context import Context
    from unpacked.recipe import RecipeSet
    from unpacked.settings import load
    settings = load({"cache": str(tmp_path / "cache"), "recipes": str(tmp_path / "r")},
                    environ={}, project=tmp_path)
    ctx = Context(settings, RecipeSet([], [], []))
    ctx.plans_inherited = _plans()          # what this process holds when they are forked
    ctx.workers = Workers(ctx, 2)
    yield ctx
    ctx.workers.stop()


def test_workers_hold_no_plan_and_read_what_the_run_wrote_after_they_started(pool):
    ctx = pool
    assert ctx.plan is not None                     # built after the workers were forked
    assert _plans() > ctx.plans_inherited
    ctx.state.put_tags("reg/a", ["1"])              # resolved after they were forked
    seen = _look(ctx, "reg/a")
    assert seen["pid"] != os.getpid() and seen["worker"]
    assert seen["tags"] == ["1"] and not seen["whole"]
    assert seen["plans"] == ctx.plans_inherited, "a worker holds no plan made after its fork"
    _write(ctx, "reg/b", ["2"])
    assert State(ctx.settings.cache_dir).tags("reg/b") == ["2"], "a worker's write is kept"
    pids = {_look(ctx, "x")["pid"] for _ in range(6)}
    assert pids <= {p.pid for p in ctx.workers.processes}


def test_a_worker_keeps_no_digest_names_from_one_action_to_the_next(pool):
    """A worker names tens of thousands of digests in a large run, never the same twice."""
    digests = [f"sha256:{i:064x}" for i in range(200)]
    for _ in range(4):                      # each worker more than once
        before, after = _folder_names(pool, digests)
        assert before == 0 and after >= 200


def test_an_actions_values_come_back_as_one_object_each(pool):
    """doit keeps every task's values to the run's end: a digest or recipe set that many
    tasks name is one string object, not a copy from the pipe for each."""
    one, two = (_values(pool, "sha256:" + "a" * 64) for _ in range(2))
    assert one == two == {"digest": "sha256:" + "a" * 64, "set": "f" * 64}
    assert one["digest"] is two["digest"] and one["set"] is two["set"]
    assert all(a is b for a, b in zip(one, two, strict=True)), "and the names too"


def test_what_a_worker_inherits_is_frozen_for_the_collector(pool):
    """Neither process's cycle collections walk the objects made before the fork (a walk
    writes to each object: every page of them would be copied, in the run and each worker)."""
    assert gc.get_freeze_count() > 0 and _look(pool, "x")["frozen"] > 0


def test_an_action_that_breaks_in_a_worker_fails_with_its_traceback(pool):
    with pytest.raises(RemoteError, match=r"(?s)Traceback.*_bug.*ValueError: a bug"):
        _bug(pool)
    assert _look(pool, "x")["worker"], "the worker is still usable"


def test_a_worker_that_dies_fails_its_action_and_the_others_go_on(pool):
    with pytest.raises(WorkerDied, match=r"ended while running _die \(exit code -9\)"):
        _die(pool)
    assert _look(pool, "x")["worker"], "the other worker answers"


def test_what_cannot_be_sent_fails_its_action_and_loses_no_worker(pool):
    for _ in range(3):                      # more than there are workers
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            _look(pool, lambda: "a local function does not pickle")
    assert _look(pool, "x")["worker"]


def test_a_stopped_pool_runs_nothing_and_its_workers_are_gone(pool):
    processes = list(pool.workers.processes)
    pool.workers.stop()
    assert all(p.exitcode == 0 for p in processes), "told to end, they ended"
    with pytest.raises(WorkerDied, match="the run is ending"):
        _look(pool, "x")                    # never run in this process instead


def test_a_worker_ends_when_its_run_is_gone(pool):
    process, conn = pool.workers.free.get()
    conn.close()                            # as when the run's process is gone
    process.join(10)
    assert process.exitcode == 0, "it saw the end of its pipe"


def test_without_workers_an_action_runs_in_this_process(tmp_path):
    from unpacked.build.context import Context
    from unpacked.settings import load
    ctx = Context(load({"cache": str(tmp_path / "cache")}, environ={}, project=tmp_path))
    assert _look(ctx, "x")["pid"] == os.getpid()


def test_workers_start_before_the_resolve(registry, layout, site):
    """Forked before the resolve and the plan, so that they never hold them (a run's log)."""
    repo = unique("early")
    push(registry, layout, repo, "v1", [Entry("a", b"a")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    site.env["UNPACKED_VERBOSITY"] = "2"
    done = site.doit("-n", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    started = next(i for i, x in enumerate(lines) if "2 worker processes started" in x)
    assert started < next(i for i, x in enumerate(lines) if "resolving" in x)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    s.runs = []
    yield s
    for run in s.runs:          # a failed test leaves no run behind
        if run.poll() is None:
            run.kill()
            run.communicate()
    s.close()


def workers(pid: int) -> list[int]:
    """The run's worker processes (``-n``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_slow_parallel(registry, layout, site, proxy):
    """A two-worker run with a small image and one whose big layer trickles in; returns
    once that layer's ingest is under way."""
    quick, slow = unique("quick"), unique("slow")
    push(registry, layout, quick, "v1", [Entry("q", b"q")])
    img = push(registry, layout, slow, "v1", [Entry("big", os.urandom(2 << 20))])
    proxy.add(f"/blobs/{img.layers[1]}", "slow", at=65536, delay=0.2)
    site.recipe([f"http://{proxy.host}/{quick}:v1", f"http://{proxy.host}/{slow}:v1"])
    run = site.start("-n", "2")
    site.runs.append(run)
    assert wait_for(lambda: temps(site)), "the ingest never started"
    return run, (quick, slow)


def test_a_killed_worker_ends_the_run_and_says_so(registry, layout, site, proxy):
    run, names = start_slow_parallel(registry, layout, site, proxy)
    revision = site.revision()
    for pid in workers(run.pid):
        os.kill(pid, signal.SIGKILL)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 3, out + err
    assert "a worker process died (signal 9)" in out + err
    assert "transaction aborted" in out
    assert site.revision() == revision and not site.transaction_open()

    proxy.clear()
    again = site.doit()
    assert again.returncode == 0, again.stdout + again.stderr
    for name in names:
        assert (site.repo_root / proxy.host / f"{name}:v1").is_dir()


def test_workers_of_a_killed_run_die_with_it_and_leave_the_repository_usable(
        registry, layout, site, proxy):
    run, names = start_slow_parallel(registry, layout, site, proxy)
    forked = workers(run.pid)
    assert forked, "a run with -n 2 started no workers"
    run.kill()
    run.communicate(timeout=30)
    assert wait_for(lambda: not any(alive(p) for p in forked), 20), "orphaned workers live on"

    proxy.clear()
    started = time.monotonic()
    again = site.doit()
    assert again.returncode == 0, again.stdout + again.stderr
    assert time.monotonic() - started < 120
    assert "aborting the transaction left open" in again.stderr
    for name in names:
        assert (site.repo_root / proxy.host / f"{name}:v1").is_dir()
    assert temps(site) == []
