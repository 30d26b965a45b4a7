"""Garbage collection end to end, with the clock set by the test (UNPACKED_NOW)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import pytest
from helpers import unique, unstamped
from helpers.images import Entry
from helpers.pipeline import push
from helpers.site import Site

DAY = 86400
T0 = 1_900_000_000


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    s.env["UNPACKED_GC_MAX_DROPPED"] = "100"     # the mass-drop guard has its own tests
    yield s
    s.close()


def run(site, at: float, *args, code=0):
    site.env["UNPACKED_NOW"] = str(at)
    done = site.doit(*args)
    assert done.returncode == code, done.stdout + done.stderr
    return done


def flats(site):
    return {p.name for p in (site.repo_root / ".flat").iterdir() if not p.name.startswith(".")}


def layers(site):
    return {p.name for p in (site.repo_root / ".layers").iterdir() if not p.name.startswith(".")}


def test_dropped_image_then_its_flat_and_unique_layers(registry, layout, site):
    keep, drop = unique("keep"), unique("drop")
    k = push(registry, layout, keep, "v1", [Entry("k", b"k")])
    d = push(registry, layout, drop, "v1", [Entry("d", b"d")])
    site.recipe([f"http://{registry.host}/{keep}:v1", f"http://{registry.host}/{drop}:v1"])
    run(site, T0)
    site.recipe([f"http://{registry.host}/{keep}:v1"])
    done = run(site, T0 + 3600)
    assert "gc: 1 deleted" in done.stdout
    assert not os.path.lexists(site.repo_root / registry.host / f"{drop}:v1")
    assert not (site.repo_root / ".metadata" / registry.host / f"{drop}:v1").exists()
    assert d.config_digest[7:] in flats(site) and d.layers[1][7:] in layers(site)
    run(site, T0 + 3600 + 6.9 * DAY)
    assert d.config_digest[7:] in flats(site), "kept through its grace period"
    done = run(site, T0 + 3600 + 7.01 * DAY)
    assert "gc: 2 deleted" in done.stdout
    assert d.config_digest[7:] not in flats(site) and d.layers[1][7:] not in layers(site)
    assert d.layers[0] == k.layers[0] and k.layers[0][7:] in layers(site), "shared layer stays"
    assert (site.repo_root / registry.host / f"{keep}:v1" / "k").read_bytes() == b"k"
    with sqlite3.connect(site.cache / "doit.sqlite") as db:
        ids = {r[0] for r in db.execute("select task_id from doit")}
    assert f"image:{registry.host}/{drop}:v1" not in ids
    assert f"image:{registry.host}/{keep}:v1" in ids


def test_moved_tag_old_flat_goes_after_grace(registry, layout, site):
    repo = unique("move")
    old = push(registry, layout, repo, "v1", [Entry("v", b"1")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    run(site, T0)
    new = push(registry, layout, repo, "v1", [Entry("v", b"2")])
    run(site, T0 + 60)
    run(site, T0 + 120)       # the old flat image is seen unreferenced from here on
    assert {old.config_digest[7:], new.config_digest[7:]} <= flats(site)
    run(site, T0 + 120 + 7.1 * DAY)
    assert flats(site) == {new.config_digest[7:]}
    assert old.layers[1][7:] not in layers(site) and new.layers[1][7:] in layers(site)


def test_limit_oldest_first_and_dry_run_matches(registry, layout, site):
    repos = [unique("many") for _ in range(5)]
    for repo in repos:
        push(registry, layout, repo, "v1", [Entry("x", repo.encode())])
    site.env["UNPACKED_GC_IMAGE_GRACE"] = "1"
    site.env["UNPACKED_GC_MAX_DELETIONS"] = "2"
    site.recipe([f"http://{registry.host}/{r}:v1" for r in repos])
    run(site, T0)
    site.recipe([f"http://{registry.host}/{r}:v1" for r in repos[2:]])
    run(site, T0 + 3600)                        # repos 0 and 1 dropped first
    site.recipe([f"http://{registry.host}/{unique('other')}:v1"])
    run(site, T0 + 7200, code=1)                # then 2, 3 and 4 (the new input is missing)
    later = T0 + 7200 + 1.5 * DAY
    site.env["UNPACKED_NOW"] = str(later)
    dry = subprocess.run(["unpacked", "gc", "--dry-run"], env=site.env, capture_output=True,
                         text=True, cwd=site.base)
    assert dry.returncode == 0, dry.stderr
    planned = [line.split("delete  ", 1)[1] for line in dry.stdout.splitlines()
               if line.strip().startswith("delete ")]
    assert len(planned) == 2 and "pending" in dry.stdout
    assert planned[0].startswith(f"image {registry.host}/{repos[0]}:v1")
    assert planned[1].startswith(f"image {registry.host}/{repos[1]}:v1")
    done = run(site, later, code=1)             # the new input does not exist: 1 failed
    deleted = [line.split("deleted ", 1)[1] for line in unstamped(done.stdout)
               if line.strip().startswith("deleted ")]
    assert deleted == planned
    assert "gc: 2 deleted, 3 pending" in done.stdout, done.stdout
    done = run(site, later + 60, code=1)
    assert "gc: 2 deleted, 1 pending" in done.stdout
    names = [line for line in done.stdout.splitlines() if "deleted image" in line]
    assert repos[2] in names[0] and repos[3] in names[1]


def test_losing_the_cache_never_makes_things_go_sooner(registry, layout, site):
    keep, drop = unique("keep"), unique("drop")
    push(registry, layout, keep, "v1", [Entry("k", b"k")])
    d = push(registry, layout, drop, "v1", [Entry("d", b"d")])
    site.recipe([f"http://{registry.host}/{keep}:v1", f"http://{registry.host}/{drop}:v1"])
    run(site, T0)
    site.recipe([f"http://{registry.host}/{keep}:v1"])
    run(site, T0 + 60)
    shutil.rmtree(site.cache)
    run(site, T0 + 60 + 7.5 * DAY)
    assert d.config_digest[7:] in flats(site), "its clock restarted with the cache"
    run(site, T0 + 60 + 14.6 * DAY)
    assert d.config_digest[7:] not in flats(site)


def test_tag_gone_upstream_is_kept_unless_pruning(registry, layout, site):
    repo = unique("gone")
    push(registry, layout, repo, "v1", [Entry("g", b"g")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    run(site, T0)
    registry.delete_tag(repo, "v1")
    done = run(site, T0 + 60)           # converted before: kept, reported, not a failure
    assert "is gone upstream; kept" in done.stderr and "MANIFEST_UNKNOWN" in done.stdout
    link = site.repo_root / registry.host / f"{repo}:v1"
    assert link.is_symlink()
    site.env["UNPACKED_GC_PRUNE_GONE"] = "1"
    done = run(site, T0 + 120)
    assert "gc: 1 deleted" in done.stdout and not os.path.lexists(link)


def test_wildcard_tag_gone_upstream(registry, layout, site):
    repo = unique("wgone")
    for tag in ("1.0", "1.1"):
        push(registry, layout, repo, tag, [Entry("t", tag.encode())])
    site.recipe([f"http://{registry.host}/{repo}:1.*"])
    run(site, T0)
    registry.delete_tag(repo, "1.0")
    done = run(site, T0 + 60)
    assert f"{repo}:1.0 is gone upstream; kept" in done.stderr
    assert (site.repo_root / registry.host / f"{repo}:1.0").is_symlink()


def test_deleting_odd_trees_is_complete_and_contained(registry, layout, site, tmp_path):
    drop = unique("odd")
    d = push(registry, layout, drop, "v1", [Entry("ro/file", b"f"), Entry("up", kind="symlink",
                                                                        link="/"),
                                            Entry("out", kind="symlink",
                                                  link=str(tmp_path / "outside"))])
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("untouched")
    site.recipe([f"http://{registry.host}/{drop}:v1"])
    run(site, T0)
    flat = site.repo_root / ".flat" / d.config_digest[7:]
    os.chmod(flat / "ro" / "file", 0o444)
    os.chmod(flat / "ro", 0o555)
    site.recipe([f"http://{registry.host}/{unique('none')}:v1"])
    run(site, T0 + 60, code=1)
    run(site, T0 + 60 + 8 * DAY, code=1)
    assert not flat.exists() and flats(site) == set()
    assert (tmp_path / "outside" / "canary").read_text() == "untouched"
    assert os.path.isdir("/etc") and os.path.exists("/bin/sh")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_a_failed_deletion_does_not_stop_the_others(registry, layout, site):
    a, b = unique("fa"), unique("fb")
    ia = push(registry, layout, a, "v1", [Entry("x", b"a")])
    ib = push(registry, layout, b, "v1", [Entry("x", b"b")])
    site.recipe([f"http://{registry.host}/{a}:v1", f"http://{registry.host}/{b}:v1"])
    run(site, T0)
    stuck = site.repo_root / ".flat" / ia.config_digest[7:] / "x"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable flag")
    inode = stuck.stat().st_ino
    try:
        site.recipe([f"http://{registry.host}/{unique('none')}:v1"])
        run(site, T0 + 60, code=1)
        done = run(site, T0 + 60 + 8 * DAY, code=1)
        assert "could not delete" in done.stdout or "not deleted" in done.stdout
        assert ib.config_digest[7:] not in flats(site), "the other deletions went ahead"
        assert json.loads((site.repo_root / ".unpacked" / "published.json").read_text())
        assert not site.transaction_open()
    finally:        # the flag is the inode's: every hard link of it, wherever a run moved it
        for path in site.repo_root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_ino == inode:
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_gc_with_the_cvmfs_publisher(registry, layout, tmp_path):
    site = Site(tmp_path / "cv", publisher="cvmfs")
    try:
        keep, drop = unique("ck"), unique("cd")
        push(registry, layout, keep, "v1", [Entry("k", b"k")])
        push(registry, layout, drop, "v1", [Entry("d", b"d")])
        site.recipe([f"http://{registry.host}/{keep}:v1", f"http://{registry.host}/{drop}:v1"])
        run(site, T0)
        site.recipe([f"http://{registry.host}/{keep}:v1"])
        calls = len(site.calls())
        done = run(site, T0 + 60)
        assert "gc: 1 deleted" in done.stdout
        assert [c[0] for c in site.calls()[calls:]] == ["transaction", "publish"]
        assert not os.path.lexists(site.repo_root / registry.host / f"{drop}:v1")
        calls = len(site.calls())
        run(site, T0 + 120)
        assert len(site.calls()) == calls, "nothing due: no transaction"
    finally:
        site.close()


def test_layers_of_a_thin_image_in_use_stay(registry, basic_registry, layout, site):
    from helpers.registry import PASSWORD
    repo = unique("thinref")
    old = push(registry, layout, repo, "v1", [Entry("v", b"1")])
    site.env["DUCC_OUTPUT_REGISTRY_PASS"] = PASSWORD
    site.recipe([f"http://{registry.host}/{repo}:v1"],
                extra=f"output_format: 'http://{basic_registry.host}/thin/$(image)'\n")
    run(site, T0)
    new = push(registry, layout, repo, "v1", [Entry("v", b"2")])
    site.env["DUCC_OUTPUT_REGISTRY_PASS"] = "wrong"      # the new thin image cannot be pushed
    run(site, T0 + 60, code=1)
    run(site, T0 + 60 + 8 * DAY, code=1)
    assert old.config_digest[7:] not in flats(site), "the old flat image went"
    assert old.layers[1][7:] in layers(site), "the registry's thin image still names it"
    site.env["DUCC_OUTPUT_REGISTRY_PASS"] = PASSWORD
    run(site, T0 + 60 + 8.1 * DAY)                      # pushed: the old layer's clock starts
    assert old.layers[1][7:] in layers(site)
    run(site, T0 + 60 + 15.2 * DAY)
    assert old.layers[1][7:] not in layers(site) and new.layers[1][7:] in layers(site)


@pytest.mark.parametrize("where", ["handmade/alias", "alias", ".hidden/deeper/alias"])
def test_a_flat_image_any_symlink_names_stays(registry, layout, site, where):
    drop = unique("linked")
    d = push(registry, layout, drop, "v1", [Entry("d", b"d")])
    site.recipe([f"http://{registry.host}/{drop}:v1"])
    run(site, T0)
    manual = site.repo_root / where                 # an operator's own link, anywhere
    manual.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("../" * where.count("/") + f".flat/{d.config_digest[7:]}", manual)
    site.recipe([f"http://{registry.host}/{unique('none')}:v1"])
    run(site, T0 + 60, code=1)
    run(site, T0 + 60 + 8 * DAY, code=1)
    assert d.config_digest[7:] in flats(site), "a link names it"
    os.unlink(manual)
    run(site, T0 + 60 + 8.1 * DAY, code=1)
    run(site, T0 + 60 + 15.2 * DAY, code=1)
    assert d.config_digest[7:] not in flats(site)


def test_a_public_path_another_spelling_owns_is_never_removed(registry, layout, site):
    repo = unique("spelt")
    push(registry, layout, repo, "v1", [Entry("s", b"s")])
    port = registry.host.split(":")[1]
    template = "public_path: '$(repository)$(reference)'\n"
    site.recipe([f"http://127.0.0.1:{port}/{repo}:v1"], extra=template)
    run(site, T0)
    public = site.repo_root / f"{repo}:v1"
    assert (public / "s").read_bytes() == b"s"
    site.recipe([f"http://localhost:{port}/{repo}:v1"], extra=template)
    done = run(site, T0 + 60)
    assert "gc: 1 deleted" in done.stdout, done.stdout
    assert (public / "s").read_bytes() == b"s", "the link the new spelling owns stays"
    assert not (site.repo_root / ".metadata" / f"127.0.0.1:{port}").exists()
    assert (site.repo_root / ".metadata" / f"localhost:{port}" / f"{repo}:v1").is_dir()


def test_an_old_public_path_goes_when_the_recipe_moves_it(registry, layout, site):
    repo = unique("moved")
    push(registry, layout, repo, "v1", [Entry("m", b"m")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    run(site, T0)
    old = site.repo_root / registry.host / f"{repo}:v1"
    assert old.is_symlink()
    site.recipe([f"http://{registry.host}/{repo}:v1"],
                extra="public_path: '.singularity/$(registry)/$(repository)/$(tag)'\n")
    done = run(site, T0 + 60)
    new = site.repo_root / ".singularity" / registry.host / repo / "v1"
    assert (new / "m").read_bytes() == b"m"
    assert not os.path.lexists(old), done.stdout
    assert "deleted public path" in done.stdout
