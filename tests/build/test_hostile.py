"""Hostile registries and images through a whole run: each fails alone with one line, nothing
is written outside the repository, the good images are published."""

from __future__ import annotations

import gzip
import os
import signal
import stat
import subprocess
import time

import pytest
from helpers import unique, unstamped
from helpers.hostile import OCI_LAYER, Answer, dumps, hang, sha, valid_image
from helpers.images import Entry, skopeo_copy, tar_bytes
from helpers.pipeline import push
from helpers.site import Site


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    yield s
    s.close()


def outside_untouched(site) -> None:
    """Nothing beside the repository root changed (the root's parent holds only repos)."""
    assert sorted(os.listdir(site.root)) == [site.repo]
    assert sorted(os.listdir(site.base)) == ["cache", "cvmfs", "recipes"]


def test_hostile_images_fail_alone(registry, layout, site, hostile):
    good = unique("good")
    push(registry, layout, good, "v1", [Entry("g", b"good")])
    layer = tar_bytes([Entry("ok", b"ok")])
    manifest, config = valid_image(layer, sha(layer))
    blobs = {sha(layer): layer}
    hostile.image("evil/ok", "1", manifest, config, blobs)        # what the wildcard may use
    hostile.on("GET", "/v2/evil/ok/tags/list", Answer(200, {}, dumps({"tags": [
        "1", "x/../../../outside", "../up", "2\x1b[31m"]})))
    spoilt = dict(manifest, layers=[dict(manifest["layers"][0], digest="sha256:../../x")])
    hostile.image("evil/digest", "v1", spoilt, config)
    hostile.image("evil/notjson", "v1", b"\x00\x01 not json", None)
    hostile.image("evil/size", "v1", dict(manifest, config=dict(manifest["config"],
                                                                 size="12")), config)
    evil_text = dumps({"errors": [{"code": "DENIED", "message":
                                   "\x1b[2J\nunpacked: 50 added, 0 failed"}]})
    hostile.on("*", "/v2/evil/forged/", Answer(403, {}, evil_text))
    inputs = [f"http://{registry.host}/{good}:v1", f"http://{hostile.host}/evil/ok:*",
              f"http://{hostile.host}/evil/digest:v1", f"http://{hostile.host}/evil/notjson:v1",
              f"http://{hostile.host}/evil/size:v1", f"http://{hostile.host}/evil/forged:v1"]
    site.recipe(inputs)
    done = site.doit()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Traceback" not in out and "\x1b" not in out
    assert not any(line.startswith("unpacked: 50 added") for line in unstamped(out))
    assert (site.repo_root / registry.host / f"{good}:v1" / "g").read_bytes() == b"good"
    assert (site.repo_root / hostile.host / "evil/ok:1" / "ok").read_bytes() == b"ok"
    for name, why in (("evil/digest:v1", "layers[0].digest"), ("evil/notjson:v1", "JSON"),
                      ("evil/size:v1", "config.size"), ("evil/forged:v1", "403")):
        lines = [x for x in unstamped(done.stdout) if f"failed {hostile.host}/{name}" in x]
        assert len(lines) == 1 and why in lines[0], (name, out)
    assert "refused by the tag grammar" in done.stderr
    outside_untouched(site)
    assert not (site.root / "outside").exists() and not (site.base / "up").exists()


def test_sigterm_while_resolving_ends_at_once(site, hostile):
    hostile.on("*", "/manifests/", Answer(write=hang(120)))
    site.recipe([f"http://{hostile.host}/slow/img:v1"])
    run = site.start()
    deadline = time.time() + 30
    while time.time() < deadline and not hostile.requests:
        time.sleep(0.05)
    assert hostile.requests, "the resolve never started"
    started = time.time()
    os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 143, err
    assert time.time() - started < 5 and "interrupted by SIGTERM" in err
    assert "Traceback" not in err and not site.transaction_open()


def test_one_image_cannot_poison_a_layer_another_shares(registry, layout, site, hostile):
    """The hostile image is listed first and names the good image's base layer, claiming a
    wrong diff_id and serving corrupt bytes: the good image converts, the hostile one fails."""
    good = unique("shared")
    img = push(registry, layout, good, "v1", [Entry("own", b"own")])
    base = img.layers[0]
    manifest, config = valid_image(b"", "sha256:" + "0" * 64)
    manifest["layers"][0].update(digest=base, mediaType=OCI_LAYER + "+gzip",
                                 size=len(gzip.compress(b"x")))
    hostile.image("evil/poison", "v1", manifest, config, {base: b"corrupt bytes"})
    site.recipe([f"http://{hostile.host}/evil/poison:v1", f"http://{registry.host}/{good}:v1"])
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert (site.repo_root / registry.host / f"{good}:v1" / "own").read_bytes() == b"own"
    poisoned = [x for x in unstamped(done.stdout) if f"failed {hostile.host}" in x]
    assert len(poisoned) == 1, done.stdout
    assert "failed " + registry.host not in done.stdout
    again = site.doit()
    assert again.returncode == 1 and "1 unchanged" in again.stdout, "not retried every run"


def test_every_layer_of_a_recompressed_image_is_ingested(registry, layout, site):
    """Same config (diff_ids), other blobs: its flat image exists already, but its own
    layers must be in .layers/ too (thin images and DUCC's GC name them)."""
    gz, zst = unique("gz"), unique("zst")
    layers = [tar_bytes([Entry("a", b"a")]), tar_bytes([Entry("b", b"b")])]
    one = layout.image("v1", layers, how="gzip")
    skopeo_copy(layout.path, "v1", f"{registry.host}/{gz}:v1")
    two = layout.image("v1", layers, how="zstd")
    skopeo_copy(layout.path, "v1", f"{registry.host}/{zst}:v1")
    assert one.config_digest == two.config_digest and one.layers != two.layers
    site.recipe([f"http://{registry.host}/{gz}:v1", f"http://{registry.host}/{zst}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    for digest in one.layers + two.layers:
        assert (site.repo_root / ".layers" / digest[7:] / "layer.json").is_file(), digest


def test_modes_do_not_depend_on_the_umask(registry, layout, site):
    repo = unique("umask")
    img = push(registry, layout, repo, "v1", [Entry("app/x", b"x")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = subprocess.run(["sh", "-c", "umask 077 && exec \"$@\"", "sh", *site.doit_argv()],
                          cwd=site.project, env=site.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    root = site.repo_root
    meta = root / ".metadata" / registry.host / f"{repo}:v1"
    flat = root / ".flat" / img.config_digest[7:]
    for folder in (root / ".layers", root / ".layers" / img.layers[1][7:], root / ".flat", flat,
                   meta, meta.parent, flat / ".singularity.d", flat / ".singularity.d/env",
                   root / registry.host):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in (meta / "image.json", meta / "manifest.json",
                 root / ".layers" / img.layers[1][7:] / "layer.json", flat / "etc/hosts",
                 flat / ".singularity.d/labels.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    assert stat.S_IMODE((flat / ".singularity.d/runscript").stat().st_mode) == 0o755


def test_planted_symlinks_are_never_followed(registry, layout, site, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("untouched")
    repo = unique("planted")
    image = [Entry(".singularity.d", kind="dir"),
             Entry(".singularity.d/runscript", kind="symlink", link=str(outside / "target")),
             Entry(".singularity.d/env", kind="symlink", link=str(outside)),
             Entry("etc/hosts", kind="symlink", link=str(outside / "target")),
             Entry("etc/.tmp-hosts-1", kind="symlink", link=str(outside / "target"))]
    img = push(registry, layout, repo, "v1", image)
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stderr
    flat = site.repo_root / ".flat" / img.config_digest[7:]
    assert (outside / "target").read_text() == "untouched" and os.listdir(outside) == ["target"]
    assert (flat / ".singularity.d/runscript").is_file()
    assert not (flat / ".singularity.d/runscript").is_symlink()
    assert (flat / "etc/hosts").is_file() and (flat / "etc/hosts").read_bytes() == b""
    assert (flat / ".singularity.d/env").is_symlink(), "the image's own link is kept"


def test_a_symlinked_layers_folder_is_refused(registry, layout, site, tmp_path):
    outside = tmp_path / "outside"
    (outside / ("a" * 64)).mkdir(parents=True)
    site.repo_root.mkdir(parents=True)
    (site.repo_root / ".layers").symlink_to(outside)
    (site.repo_root / ".flat").symlink_to(outside)
    repo = unique("seeded")
    push(registry, layout, repo, "v1", [Entry("x", b"x")])
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    site.env["UNPACKED_GC_GRACE"] = "0"
    done = site.doit()
    assert done.returncode == 3, done.stdout + done.stderr     # a damaged repository: stop
    assert "is not a folder (a symlink or a file); refused" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    (site.repo_root / ".flat").unlink()
    done = site.doit()
    assert done.returncode == 3 and ".layers is not a folder" in done.stderr, done.stderr
    assert os.listdir(outside) == ["a" * 64], "nothing written through, nothing deleted"
    assert (outside / ("a" * 64)).is_dir()


def test_catalog_markers_of_a_layer_never_reach_anything(registry, layout, tmp_path):
    site = Site(tmp_path / "cv", publisher="cvmfs")
    try:
        outside = tmp_path / "outside"
        outside.write_text("untouched")
        repo = unique("catalog")
        img = push(registry, layout, repo, "v1", [
            Entry(".cvmfscatalog", kind="symlink", link=str(outside)),
            Entry("sub/.cvmfscatalog", kind="symlink", link=str(outside)),
            Entry("sub/file", b"f")])
        site.recipe([f"http://{registry.host}/{repo}:v1"])
        done = site.doit()
        assert done.returncode == 0, done.stdout + done.stderr
        assert outside.read_text() == "untouched"
        layerfs = site.repo_root / ".layers" / img.layers[1][7:] / "layerfs"
        marker = layerfs / ".cvmfscatalog"
        assert marker.is_file() and not marker.is_symlink() and marker.stat().st_size == 0
        assert not os.path.lexists(layerfs / "sub/.cvmfscatalog")
        flat = site.repo_root / ".flat" / img.config_digest[7:]
        assert not os.path.lexists(flat / "sub/.cvmfscatalog")
        assert (flat / ".cvmfscatalog").is_file() and not (flat / ".cvmfscatalog").is_symlink()
    finally:
        site.close()


def test_an_index_that_lies_about_a_platform_fails_that_image_alone(registry, layout, site,
                                                                    hostile):
    """The index's arm64 entry names the amd64 manifest: refused as a bad document (exit 1,
    the image failed), the other image published."""
    good = unique("good")
    push(registry, layout, good, "v1", [Entry("g", b"good")])
    layer = tar_bytes([Entry("ok", b"ok")])
    manifest, config = valid_image(layer, sha(layer))
    amd = hostile.image("evil/multi", "amd", manifest, config, {sha(layer): layer})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": amd, "size": len(dumps(manifest)),
                            "platform": {"os": "linux", "architecture": arch}}
                           for arch in ("amd64", "arm64")]}
    served = Answer(200, {"Content-Type": index["mediaType"],
                          "Docker-Content-Digest": sha(dumps(index))}, dumps(index))
    hostile.on("*", r"/evil/multi/manifests/v1$", served)
    hostile.on("*", "/evil/multi/manifests/" + sha(dumps(index)) + "$", served)
    site.env["UNPACKED_PLATFORMS"] = "linux/amd64,linux/arm64"
    site.recipe([f"http://{registry.host}/{good}:v1", f"http://{hostile.host}/evil/multi:v1"])
    done = site.doit()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    lines = [x for x in unstamped(done.stdout) if f"failed {hostile.host}/evil/multi:v1" in x]
    assert len(lines) == 1 and "config says linux/amd64" in lines[0], out
    assert (site.repo_root / registry.host / f"{good}:v1" / "g").read_bytes() == b"good"
    assert not os.path.lexists(site.repo_root / hostile.host / "evil/multi:v1")
    outside_untouched(site)


def test_a_layer_that_fails_fails_each_image_it_serves_with_its_reason(site, hostile):
    """Two images share a layer the registry serves corrupt: each image's line gives the
    layer's own reason (looked up in the plan when it fails), not only that a dependency
    failed."""
    layer = tar_bytes([Entry("x", b"x")])
    manifest, config = valid_image(layer, sha(layer))
    for name in ("evil/one", "evil/two"):
        hostile.image(name, "v1", manifest, config, {sha(layer): b"not the layer at all"})
    site.recipe([f"http://{hostile.host}/evil/one:v1", f"http://{hostile.host}/evil/two:v1"])
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    for name in ("evil/one:v1", "evil/two:v1"):
        lines = [x for x in unstamped(done.stdout) if f"failed {hostile.host}/{name}" in x]
        assert len(lines) == 1, done.stdout
        assert f"blob {sha(layer)}" in lines[0] and "transfer failed" in lines[0], lines[0]


def test_a_flat_image_that_fails_fails_each_image_it_serves_with_its_reason(site, hostile):
    """Three images share a layer; one's config tells its diff_id true, so the layer is
    ingested; the other two share a config that lies about it: their one flat image is
    refused, each of the two gives its reason (the flat image's, which their own link checks
    repeat), nothing is published for them, and the third is added."""
    layer = tar_bytes([Entry("x", b"x")])
    lie = "sha256:" + "0" * 64
    good = valid_image(layer, sha(layer))
    bad = valid_image(layer, lie)
    hostile.image("evil/good", "v1", *good, {sha(layer): layer})
    for name in ("evil/one", "evil/two"):
        hostile.image(name, "v1", *bad, {sha(layer): layer})
    site.recipe([f"http://{hostile.host}/evil/{n}:v1" for n in ("good", "one", "two")])
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 added" in done.stdout and "2 failed" in done.stdout, done.stdout
    for name in ("evil/one:v1", "evil/two:v1"):
        lines = [x for x in unstamped(done.stdout) if f"failed {hostile.host}/{name}" in x]
        assert len(lines) == 1, done.stdout
        assert f"diff_id {lie}" in lines[0] and "its config says" in lines[0], lines[0]
    assert not (site.repo_root / hostile.host / "evil/one:v1").exists()
