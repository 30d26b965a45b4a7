"""The cvmfs publisher against a cvmfs_server stand-in that enforces the real rules."""

from __future__ import annotations

import json
import os
import signal
import time

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


def test_a_failed_publish_is_aborted_and_the_next_run_goes_on(registry, layout, cvmfs_site):
    site = cvmfs_site
    repo = unique("pubfail")
    push(registry, layout, repo, "v1", [Entry("a", b"a")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    site.env["CVMFS_STANDIN_FAIL"] = "publish"
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "injected failure" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert site.calls()[-1] == ["abort", "-f", site.repo]
    assert not site.transaction_open(), "our marker went with the aborted transaction"
    del site.env["CVMFS_STANDIN_FAIL"]
    done = site.doit()
    assert done.returncode == 0, done.stderr
    assert "1 added" in done.stdout and site.calls()[-1][0] == "publish"


def test_a_failed_transaction_stops_the_run_and_writes_nothing(registry, layout, cvmfs_site):
    site = cvmfs_site
    repo = unique("txnfail")
    push(registry, layout, repo, "v1", [Entry("a", b"a")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    site.env["CVMFS_STANDIN_FAIL"] = "transaction"
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "transaction not opened" in done.stdout + done.stderr
    assert done.stdout.count("injected failure") + done.stderr.count("injected failure") <= 3
    assert os.listdir(site.repo_root) == [], "nothing, not even a folder, was written"
    assert not site.transaction_open()
    assert [c[0] for c in site.calls()] == ["mkfs", "transaction"]


@pytest.mark.parametrize("jobs, seconds", [("1", 3), ("2", 14)])
def test_signals_never_cut_a_publish(registry, layout, cvmfs_site, jobs, seconds):
    """Also when a worker publishes and the publish outlasts the grace a worker is given."""
    site = cvmfs_site
    repo = unique("slowpub")
    push(registry, layout, repo, "v1", [Entry("a", b"a")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    site.env["CVMFS_STANDIN_SLEEP"] = f"publish:{seconds}"
    site.env["UNPACKED_JOBS"] = jobs            # 1: the publish runs in the run's own process
    run = site.start()
    log = site.state / "calls.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (site.state / "spool" / site.repo /
                                          "unpacked-transaction.json").exists():
        time.sleep(0.05)
    while time.time() < deadline and '"publishing"' not in \
            (site.state / "spool" / site.repo / "unpacked-transaction.json").read_text():
        time.sleep(0.05)
    time.sleep(0.5)                   # cvmfs_server publish is running now
    os.kill(run.pid, signal.SIGINT)
    os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    calls = [json.loads(x)["argv"][0] for x in log.read_text().splitlines()]
    assert calls[-1] == "publish", f"{calls}\n{out}\n{err}"
    assert json.loads(log.read_text().splitlines()[-1])["rc"] == 0, "the publish completed"
    assert site.revision() == 2 and not site.transaction_open()
    assert run.returncode in (130, 143), err


@pytest.mark.parametrize("publisher", ["cvmfs", "local"])
def test_sigkill_at_every_step_then_a_normal_run(registry, layout, tmp_path, publisher):
    """Killed at each step of opening and publishing, then killed again at the first steps
    of the run that recovers, then run again: the repository ends as a clean run leaves it,
    and no public link ever names a missing flat."""
    repo = unique("crashstep")
    push(registry, layout, repo, "v1", [Entry("a", b"a")])
    image = f"http://{registry.host}/{repo}:v1"

    def fresh(name):
        site = Site(tmp_path / name, publisher=publisher)
        site.env["UNPACKED_JOBS"] = "1"
        site.recipe([image])
        return site

    clean = fresh("clean")
    assert clean.doit().returncode == 0
    expected = content(clean)
    clean.close()
    step = 0
    while True:
        step += 1
        site = fresh(f"step{step}")
        site.env.update(UNPACKED_CRASH_AT=str(step), UNPACKED_CRASH_LOG=str(tmp_path / "log"))
        killed = site.doit()
        assert not dangling(site), f"a public link names a missing flat image at step {step}"
        del site.env["UNPACKED_CRASH_AT"]
        if killed.returncode != -9:
            assert killed.returncode == 0, killed.stderr
            site.close()
            break
        for first in (1, 2):            # the recovery's own first steps, killed too
            site.env["UNPACKED_CRASH_AT"] = str(first)
            recovering = site.doit()
            assert not dangling(site), f"a dangling link after step {step}, then {first}"
            if recovering.returncode != -9:
                break
        del site.env["UNPACKED_CRASH_AT"]
        again = site.doit()
        assert again.returncode == 0, again.stdout + again.stderr
        assert content(site) == expected, f"after a kill at step {step}"
        assert not dangling(site) and not site.transaction_open()
        site.close()
    assert step > 4, "the hook never fired: no steps were tested"


def content(site) -> dict:
    """What clients see: paths, kinds, link targets and file bytes (not times)."""
    out = {}
    root = site.repo_root
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".unpacked" or rel.name in ("image.json", "layer.json"):
            continue
        if path.is_symlink():
            out[str(rel)] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(rel)] = path.read_bytes()
        else:
            out[str(rel)] = "dir"
    return out


def dangling(site) -> list[str]:
    return [str(p) for p in site.repo_root.rglob("*:v1") if p.is_symlink() and not p.exists()]
