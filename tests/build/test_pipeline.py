"""The doit pipeline end to end, as an operator runs it, on a real registry."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
from helpers import unique, unstamped
from helpers.images import Entry, skopeo_copy, tar_bytes
from helpers.pipeline import push, run_interrupted_later, start_slow, temps
from helpers.site import Site

from unpacked.build import doit_private


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    yield s
    s.close()


def three_images(registry, layout):
    """Two images sharing a base layer (one with whiteouts) and a single-layer one."""
    a, b, c = unique("a"), unique("b"), unique("c")
    imgs = {
        a: push(registry, layout, a, "v1", [Entry("app/a", b"a"), Entry("usr/share/.wh.doc", b""),
                                           Entry("var/cache/.wh..wh..opq", b"")]),
        b: push(registry, layout, b, "v1", [Entry("app/b", b"b")], Env=["B=1"],
                WorkingDir="/app", User="1000:1000"),
    }
    img = layout.image("v1", [tar_bytes([Entry("only", b"one layer")])])
    skopeo_copy(layout.path, "v1", f"{registry.host}/{c}:v1")
    imgs[c] = img
    return imgs


def check_layout(site: Site, host: str, imgs: dict) -> None:
    root = site.repo_root
    for repo, img in imgs.items():
        for digest in img.layers:
            d = root / ".layers" / digest[7:]
            assert (d / "layerfs").is_dir()
            info = json.loads((d / "layer.json").read_text())
            assert info["digest"] == digest and info["diff_id"] in img.diff_ids
        flat = root / ".flat" / img.config_digest[7:]
        assert (flat / ".singularity.d" / "runscript").is_file()
        meta = root / ".metadata" / host / f"{repo}:v1"
        manifest = (meta / "manifest.json").read_bytes()
        assert "sha256:" + hashlib.sha256(manifest).hexdigest() == img.manifest_digest
        assert json.loads((meta / "config.json").read_bytes()) == img.config
        summary = json.loads((meta / "image.json").read_text())
        assert summary["config_digest"] == img.config_digest
        inner = img.config["config"]
        assert summary["working_dir"] == inner.get("WorkingDir", "")
        assert summary["user"] == inner.get("User", "")
        assert summary["input"] == f"http://{host}/{repo}:v1"
        public = root / host / f"{repo}:v1"
        depth = f"{host}/{repo}:v1".count("/")
        assert os.readlink(public) == "../" * depth + ".flat/" + img.config_digest[7:]
        assert public.resolve() == flat.resolve()


def test_cold_run_then_noop(registry, layout, site, proxy):
    imgs = three_images(registry, layout)
    site.recipe([f"http://{proxy.host}/{r}:v1" for r in imgs])
    done = site.doit()
    assert done.returncode == 0, done.stderr + done.stdout
    assert "3 added" in done.stdout
    check_layout(site, proxy.host, imgs)
    a = next(iter(imgs))
    flat_a = site.repo_root / ".flat" / imgs[a].config_digest[7:]
    assert not (flat_a / "usr/share/doc").exists() and (flat_a / "usr/bin/tool").exists()
    assert os.listdir(flat_a / "var/cache") == []
    assert site.revision() == 1 and not site.transaction_open()
    shared = imgs[a].layers[0]
    assert proxy.count("GET", f"/blobs/{shared}") == 1, "a shared layer is downloaded once"
    proxy.clear()
    again = site.doit()
    assert again.returncode == 0, again.stderr
    assert again.stdout == "" and again.stderr == "", "a no-op cron run is silent"
    assert site.revision() == 1 and not site.transaction_open()
    assert proxy.count("HEAD") == 3 and proxy.count("GET") == 0
    # a bare no-op makes no task of what is up to date, yet keeps doit's records of them:
    # the run after it is a no-op as well, and `doit list -s` sees every task up to date
    rows = doit_private.recorded_values(site.cache / "doit.sqlite")
    assert len([r for r in rows if r.startswith("layer:")]) == \
        len({x for img in imgs.values() for x in img.layers})
    assert site.doit().stdout == "" and proxy.count("GET") == 0
    assert doit_private.recorded_values(site.cache / "doit.sqlite") == rows
    listing = site.doit("list", "--all", "-s")
    assert listing.returncode == 0 and "\nR " not in "\n" + listing.stdout, listing.stdout


def test_moved_tag_flips_link_in_one_transaction(registry, layout, site):
    repo = unique("moving")
    old = push(registry, layout, repo, "v1", [Entry("version", b"1")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    new = push(registry, layout, repo, "v1", [Entry("version", b"2")])
    site.env["UNPACKED_VERBOSITY"] = "2"    # its debug lines say how often a run planned
    done = site.doit()
    assert done.returncode == 0 and "1 updated" in done.stdout
    assert "planning again" in done.stderr and done.stderr.count("planned in") == 2, \
        "the plan made during the resolve is stale once the tag moved"
    public = site.repo_root / registry.host / f"{repo}:v1"
    assert (public / "version").read_bytes() == b"2"
    assert (site.repo_root / ".flat" / old.config_digest[7:]).is_dir(), "kept for GC"
    assert (site.repo_root / ".flat" / new.config_digest[7:]).is_dir()
    meta = site.repo_root / ".metadata" / registry.host / f"{repo}:v1" / "image.json"
    assert json.loads(meta.read_text())["manifest_digest"] == new.manifest_digest
    assert site.revision() == 2
    assert new.layers[0] == old.layers[0]
    again = site.doit()
    assert again.returncode == 0 and again.stderr.count("planned in") == 1 \
        and "planning again" not in again.stderr, "a no-op run plans once, while it resolves"
    assert site.revision() == 2


def test_missing_image_and_corrupt_layer_stay_local(registry, layout, site, proxy):
    good, bad = unique("good"), unique("bad")
    push(registry, layout, good, "v1", [Entry("g", b"good")])
    bad_img = push(registry, layout, bad, "v1", [Entry("b", os.urandom(5000))])
    proxy.add(f"/blobs/{bad_img.layers[1]}", "flip", at=100, times=99)
    site.recipe([f"http://{proxy.host}/{good}:v1", f"http://{proxy.host}/{bad}:v1",
                 f"http://{proxy.host}/{unique('absent')}:v1"])
    done = site.doit()
    assert done.returncode == 1
    assert "1 added" in done.stdout and "2 failed" in done.stdout
    assert f"failed {proxy.host}/{bad}:v1: blob {bad_img.layers[1]}" in done.stdout
    assert "MANIFEST_UNKNOWN" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert (site.repo_root / proxy.host / f"{good}:v1").is_symlink()
    assert not (site.repo_root / proxy.host / f"{bad}:v1").exists()
    assert site.revision() == 1 and not site.transaction_open()
    assert not (site.repo_root / ".layers" / bad_img.layers[1][7:]).exists()
    # the bad image is retried next run, and converts once the registry behaves
    proxy.clear()
    done = site.doit()
    assert done.returncode == 1 and "1 added" in done.stdout and "1 failed" in done.stdout


def test_kill_9_mid_ingest_then_recover(registry, layout, site, proxy):
    repo = unique("killed")
    img, run = start_slow(registry, layout, site, proxy, repo, 3 << 20, 0.05)
    time.sleep(0.3)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert site.transaction_open()
    assert not (site.repo_root / ".layers" / img.layers[1][7:]).exists()
    proxy.clear()
    done = site.doit()
    assert done.returncode == 0, done.stderr
    assert "aborting the transaction left open" in done.stderr
    assert temps(site) == []
    assert not [p for p in (site.repo_root / ".flat").iterdir() if p.name.startswith(".")]
    public = site.repo_root / proxy.host / f"{repo}:v1"
    assert (public / "big").stat().st_size == 3 << 20
    assert not site.transaction_open()


def test_second_run_exits_at_once(registry, layout, site, proxy):
    _, first = start_slow(registry, layout, site, proxy, unique("slow"), 2 << 20, 0.03)
    before = sorted(os.listdir(site.repo_root))
    started = time.monotonic()
    second = site.doit()
    assert time.monotonic() - started < 10
    assert second.returncode == 75
    assert "another run" in second.stderr and "exiting without changes" in second.stderr
    assert sorted(os.listdir(site.repo_root)) == before
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert site.revision() == 1


def test_forget_forces_exactly_that_rebuild(registry, layout, site):
    one, two = unique("one"), unique("two")
    i1 = push(registry, layout, one, "v1", [Entry("x", b"1")])
    push(registry, layout, two, "v1", [Entry("x", b"2")])
    site.recipe([f"http://{registry.host}/{one}:v1", f"http://{registry.host}/{two}:v1"])
    assert site.doit().returncode == 0
    layers = site.repo_root / ".layers"

    def ingested():
        return {d.name: json.loads((d / "layer.json").read_text())["ingested_at"]
                for d in layers.iterdir() if not d.name.startswith(".")}
    before = ingested()
    own = i1.layers[1][7:]
    assert site.doit("forget", f"layer:{own}").returncode == 0
    assert site.doit().returncode == 0
    after = ingested()
    assert [k for k in before if before[k] != after[k]] == [own]

    flat = site.repo_root / ".flat" / i1.config_digest[7:]
    inode = flat.stat().st_ino
    others = {p.name: p.stat().st_ino for p in (site.repo_root / ".flat").iterdir()}
    assert site.doit("forget", f"image:{registry.host}/{one}:v1").returncode == 0
    done = site.doit()
    assert done.returncode == 0
    assert flat.stat().st_ino != inode, "the flat image was rebuilt"
    for name, ino in others.items():
        if name != flat.name:
            assert (site.repo_root / ".flat" / name).stat().st_ino == ino
    assert ingested() == after, "no layer was touched"
    bare = site.doit("forget")
    assert bare.returncode == 0 and "needs to be told what to forget" in bare.stdout


def test_a_layer_or_flat_folder_an_operator_removed_is_built_again(registry, layout, site):
    """A run checks that every layer and flat image it depends on is there (one listing of
    each area): a folder removed by hand, or swapped for a symlink, is built again, and
    nothing else is; ``doit info`` says which folder is missing."""
    one, two = unique("one"), unique("two")
    i1 = push(registry, layout, one, "v1", [Entry("x", b"1")])
    i2 = push(registry, layout, two, "v1", [Entry("x", b"2")])
    site.recipe([f"http://{registry.host}/{one}:v1", f"http://{registry.host}/{two}:v1"])
    assert site.doit().returncode == 0
    layer = site.repo_root / ".layers" / i1.layers[1][7:]
    flat = site.repo_root / ".flat" / i2.config_digest[7:]
    kept = {p: p.stat().st_ino for area in (".layers", ".flat")
            for p in (site.repo_root / area).iterdir() if p not in (layer, flat)}
    subprocess.run(["rm", "-rf", str(layer), str(flat)], check=True)
    info = site.doit("info", f"layer:{i1.layers[1][7:]}")
    assert f"layer folder {layer} missing" in info.stdout
    assert site.doit().returncode == 0
    assert (layer / "layer.json").is_file() and (flat / ".singularity.d").is_dir()
    assert all(p.stat().st_ino == ino for p, ino in kept.items()), "nothing else rebuilt"
    assert site.doit().returncode == 0 and site.doit("info", f"layer:{i1.layers[1][7:]}") \
        .stdout.count("missing") == 0
    (layer / "layer.json").unlink()             # half deleted by hand: its record first
    assert site.doit().returncode == 0, "nothing to build: the layer is not read"
    assert site.doit("forget", f"flat:{i1.config_digest[7:]}").returncode == 0
    assert site.doit().returncode == 0
    assert (layer / "layer.json").is_file(), "ingested again before a flat image read it"
    aside = layer.with_name("aside")
    layer.rename(aside)
    layer.symlink_to(aside)          # not a folder of the repository's own
    assert site.doit().returncode == 0
    assert layer.is_dir() and not layer.is_symlink()


def test_forget_s_and_forced_runs_reach_the_whole_chain(registry, layout, site):
    """Dependencies are walked as doit means them, however the options are spelled."""
    one = unique("chain")
    img = push(registry, layout, one, "v1", [Entry("x", b"1")])
    site.recipe([f"http://{registry.host}/{one}:v1"])
    assert not (site.root / site.repo).exists()
    for args in (("list", "--all", "-qs"), ("info", f"gc:{site.repo}"), ("list", "-s")):
        looked = site.doit(*args)
        assert looked.returncode in (0, 1), looked.stderr
    assert not (site.root / site.repo).exists(), "a look wrote into the repository"
    assert site.doit().returncode == 0
    layers = site.repo_root / ".layers"

    def ingested():
        return {h[7:]: json.loads((layers / h[7:] / "layer.json").read_text())["ingested_at"]
                for h in img.layers}
    flat = site.repo_root / ".flat" / img.config_digest[7:]
    before, inode = ingested(), flat.stat().st_ino
    forgot = site.doit("forget", "-s", f"image:{registry.host}/{one}:v1")
    assert forgot.returncode == 0, forgot.stderr
    assert site.doit().returncode == 0
    after = ingested()
    assert all(after[h] != before[h] for h in before), "forget -s forgot the layers too"
    assert flat.stat().st_ino != inode
    inode = flat.stat().st_ino
    forced = site.doit("-ac")               # -a and -c in one word, as getopt allows
    assert forced.returncode == 0, forced.stderr
    assert all(ingested()[h] != after[h] for h in after) and flat.stat().st_ino != inode
    listed = site.doit("list", "-s")
    assert "U publish" in listed.stdout and "U gc" in listed.stdout, listed.stdout


def test_list_and_info_offline(registry, layout, site, proxy):
    repo = unique("offline")
    img = push(registry, layout, repo, "v1", [Entry("x", b"x")])
    site.recipe([f"http://{proxy.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    proxy.clear()
    proxy.add("", "status", status=503, times=10_000, method="GET")
    proxy.add("", "status", status=503, times=10_000, method="HEAD")
    listed = site.doit("list", "--all", "-s")
    assert listed.returncode == 0, listed.stderr
    assert f"U image:{proxy.host}/{repo}:v1" in listed.stdout
    assert f"U layer:{img.layers[1][7:]}" in listed.stdout
    info = site.doit("info", f"image:{proxy.host}/{repo}:v1")
    assert info.returncode == 0
    assert img.manifest_digest in info.stdout and "up-to-date" in info.stdout
    assert f"{proxy.host}/{repo}:v1" in info.stdout
    site.doit("forget", f"image:{proxy.host}/{repo}:v1")
    info = site.doit("info", f"image:{proxy.host}/{repo}:v1")
    assert info.returncode == 1 and "forgotten" in info.stdout
    assert proxy.count("GET") == 0 and proxy.count("HEAD") == 0


def test_parallel_processes(registry, layout, site):
    imgs = three_images(registry, layout)
    site.recipe([f"http://{registry.host}/{r}:v1" for r in imgs])
    done = site.doit("-n", "2")
    assert done.returncode == 0, done.stderr
    check_layout(site, registry.host, imgs)
    serial = site.doit("-n", "1")
    assert serial.returncode == 0 and serial.stdout == ""


def test_malformed_recipe_is_one_line(site):
    (site.recipes / "bad.yaml").write_text("version: 1\ncvmfs_repo: x\ninptu: []\n")
    for args in ((), ("list",)):
        done = site.doit(*args)
        assert done.returncode == 3
        assert "bad.yaml:3: inptu: unknown key (did you mean 'input'?)" in done.stderr
        assert "Traceback" not in done.stderr


def test_sigterm_aborts_local_transaction(registry, layout, site, proxy):
    def snapshot():
        return sorted(str(p.relative_to(site.repo_root)) for p in site.repo_root.rglob("*")
                      if ".unpacked" not in p.parts)
    before, run = run_interrupted_later(registry, layout, site, proxy, snapshot)
    os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert snapshot() == before, "abort removed what the run added"
    assert site.revision() == 1 and not site.transaction_open()


def test_sigterm_after_the_recipe_changed_still_aborts(registry, layout, site, proxy):
    _, run = start_slow(registry, layout, site, proxy, unique("edited"), 2 << 20, 0.05)
    (site.recipes / "r.yaml").write_text(          # edited mid-run: another repository
        "version: 1\ncvmfs_repo: elsewhere.cern.ch\ninput:\n  - fedora\n")
    os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert not site.transaction_open(), "the repository the run opened was aborted"
    assert site.revision() == 0


def test_a_second_cache_on_the_same_repository_waits_its_turn(registry, layout, site, proxy,
                                                               tmp_path):
    img, run = start_slow(registry, layout, site, proxy, unique("twocaches"), 2 << 20, 0.05)
    other = dict(site.env, UNPACKED_CACHE=str(tmp_path / "other-cache"))
    second = subprocess.run(site.doit_argv(), cwd=site.project, env=other,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 75, second.stderr
    assert "another run" in second.stderr and "test.cern.ch" in second.stderr
    assert site.transaction_open(), "the first run's transaction was left alone"
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert site.revision() == 1 and (site.repo_root / ".layers" / img.layers[1][7:]).is_dir()


def test_a_public_path_two_tags_claim_stays_with_the_published_one(registry, layout, site):
    """A template without the tag sends every tag of a wildcard to one path: the tag already
    published there keeps it when a new tag (listed first) appears; the newcomer fails."""
    repo = unique("claim")
    push(registry, layout, repo, "v1", [Entry("which", b"v1")])
    template = "public_path: 'one/$(repository)'\n"
    site.recipe([f"http://{registry.host}/{repo}:*"], extra=template)
    first = site.doit()
    assert first.returncode == 0, first.stdout + first.stderr
    public = site.repo_root / "one" / repo
    assert (public / "which").read_bytes() == b"v1"
    push(registry, layout, repo, "a0", [Entry("which", b"a0")])
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert (public / "which").read_bytes() == b"v1", "the published image keeps its path"
    refused = [x for x in unstamped(done.stdout) if f"failed {registry.host}/{repo}:a0" in x]
    assert len(refused) == 1 and f"belongs to {registry.host}/{repo}:v1" in refused[0], \
        done.stdout
