"""A parallel run whose worker processes die (the OOM killer, a kill -9): the run ends and
says so, and nothing it leaves behind (its transaction, its workers) blocks the next run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import unique
from helpers.images import Entry
from helpers.pipeline import push, temps, wait_for
from helpers.site import Site


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
    """The processes doit forked for ``-n``."""
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
    assert forked, "doit -n 2 started no workers"
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
