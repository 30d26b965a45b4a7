"""A parallel run works whatever multiprocessing's default start method (spawn, or
forkserver, Python 3.14's default): the run forks its worker processes itself. And when an
operator asks doit for its own process workers (``-P process``), the actions run in those,
also when doit spawns them (the run's Context pickles)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import unique
from helpers.images import Entry
from helpers.pipeline import push
from helpers.site import PROJECT, Site

RUN = ("import multiprocessing, sys; multiprocessing.set_start_method(sys.argv[1]); "
       "from doit.doit_cmd import DoitMain; sys.exit(DoitMain().run(sys.argv[2:]))")


@pytest.mark.parametrize("method, extra", [("forkserver", []), ("fork", ["-P", "process"]),
                                           ("spawn", ["-P", "process"])])
def test_parallel_run_with(method, extra, registry, layout, tmp_path):
    site = Site(tmp_path / "site")
    repos = [unique("spawn"), unique("spawn")]
    for repo in repos:
        push(registry, layout, repo, "v1", [Entry("f", repo.encode())])
    site.recipe([f"http://{registry.host}/{r}:v1" for r in repos])
    done = subprocess.run([sys.executable, "-c", RUN, method, "-n", "2", *extra], cwd=PROJECT,
                          env=site.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 added" in done.stdout
    for repo in repos:
        public = site.repo_root / registry.host / f"{repo}:v1"
        assert (public / "f").read_bytes() == repo.encode()
