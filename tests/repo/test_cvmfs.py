"""The cvmfs publisher against a cvmfs_server stand-in that enforces the real rules."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import unique
from helpers.images import Entry
from helpers.pipeline import push, run_interrupted_later, start_slow
from helpers.site import Site


@pytest.fixture
def cvmfs_site(tmp_path):
    s = Site(tmp_path / "site", publisher="cvmfs")
    yield s
    s.close()


def tree(path):
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size)
    return out


def test_command_lines_and_catalogs(registry, layout, cvmfs_site):
    site = cvmfs_site
    repo = unique("cv")
    img = push(registry, layout, repo, "v1", [Entry("app", b"app")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stderr
    calls = site.calls()
    assert calls[0] == ["mkfs", site.repo]
    assert calls[1] == ["transaction", site.repo]
    assert calls[2][0] == "publish" and calls[2][1] == "-m" and calls[2][-1] == site.repo
    assert "1 image(s) changed" in calls[2][2] and repo in calls[2][2]
    assert len(calls) == 3
    for digest in img.layers:
        assert (site.repo_root / ".layers" / digest[7:] / "layerfs" / ".cvmfscatalog").exists()
    flat = site.repo_root / ".flat" / img.config_digest[7:]
    assert (flat / ".cvmfscatalog").exists()
    assert not (flat / "etc" / ".cvmfscatalog").exists()
    assert os.stat(flat / "app").st_nlink == 1, "cvmfs flat images are copies, not hardlinks"
    assert site.doit().returncode == 0
    assert len(site.calls()) == 3, "a no-op run opens no transaction"


def test_repository_is_read_only_outside_a_transaction(registry, layout, cvmfs_site):
    site = cvmfs_site
    state = json.loads((site.state / f"{site.repo}.json").read_text())
    if state["mounted"]:
        with pytest.raises(OSError):
            (site.repo_root / "intruder").write_text("x")
    else:
        (site.repo_root / "intruder").write_text("x")
        assert site.standin("list")
        result = site.doit()
        # the stand-in refuses the next transaction: the write was caught
        assert "outside a transaction" in result.stderr or result.returncode != 0
        (site.repo_root / "intruder").unlink()


def test_sigterm_aborts_and_restores(registry, layout, cvmfs_site, proxy):
    site = cvmfs_site
    before, run = run_interrupted_later(registry, layout, site, proxy,
                                        lambda: tree(site.repo_root))
    os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert "interrupted by SIGTERM" in out
    assert site.calls()[-1] == ["abort", "-f", site.repo]
    assert tree(site.repo_root) == before
    assert not site.transaction_open()


def test_crash_leftover_is_aborted_foreign_is_not_stolen(registry, layout, cvmfs_site, proxy):
    site = cvmfs_site
    repo = unique("crash")
    _, run = start_slow(registry, layout, site, proxy, repo, 2 << 20, 0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    proxy.clear()
    done = site.doit()
    assert done.returncode == 0, done.stderr
    assert site.calls()[-3:] == [["abort", "-f", site.repo], ["transaction", site.repo],
                                 site.calls()[-1]]
    assert site.calls()[-1][0] == "publish"
    # a transaction another program opened is reported and left alone
    site.standin("transaction", site.repo)
    push(registry, layout, repo, "v1", [Entry("big", b"changed")])
    calls = len(site.calls())
    done = site.doit()
    assert done.returncode == 75
    assert "did not open" in done.stderr and "not touching it" in done.stderr
    assert len(site.calls()) == calls
    site.standin("abort", "-f", site.repo)
