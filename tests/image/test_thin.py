"""Thin images pushed to a real registry with Basic auth, checked with skopeo."""

from __future__ import annotations

import json
import subprocess
import tarfile

import pytest
from helpers import unique
from helpers.faults import FaultProxy
from helpers.images import Entry, tar_bytes
from helpers.pipeline import push
from helpers.registry import PASSWORD, USER
from helpers.site import Site

from unpacked.image import thin
from unpacked.registry.resolved import Layer, PlatformImage


@pytest.fixture(scope="module")
def out_proxy(basic_registry):
    proxy = FaultProxy(basic_registry.host)
    yield proxy
    proxy.stop()


@pytest.fixture
def site(tmp_path, out_proxy):
    s = Site(tmp_path / "site")
    s.env["DUCC_OUTPUT_REGISTRY_PASS"] = PASSWORD
    out_proxy.clear()
    yield s
    s.close()


def thin_recipe(site, out_proxy, inputs):
    return site.recipe(inputs, extra=f"output_format: 'http://{out_proxy.host}/thin/$(image)'\n")


def fetch_thin(host: str, name: str, work) -> tuple[dict, dict, dict]:
    """skopeo inspect and skopeo copy the thin image; returns (inspect, config, thin.json)."""
    creds = f"{USER}:{PASSWORD}"
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", creds,
                              f"docker://{host}/{name}"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    work.mkdir(parents=True, exist_ok=True)
    layout = work / "oci"
    done = subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                           "--src-creds", creds, f"docker://{host}/{name}", f"oci:{layout}:x"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blob / manifest["config"]["digest"][7:]).read_text())
    assert len(manifest["layers"]) == 1
    with tarfile.open(blob / manifest["layers"][0]["digest"][7:]) as tar:
        assert tar.getnames() == ["thin.json"]
        doc = json.loads(tar.extractfile("thin.json").read())
    return json.loads(inspect.stdout), config, doc


def test_thin_images_are_pushed_once(registry, layout, site, out_proxy, tmp_path):
    repo = unique("thin")
    img = push(registry, layout, repo, "v1", [Entry("app", b"a")], Env=["A=1", "PATH=/bin"],
               Entrypoint=["/bin/echo"], Cmd=["hi"])
    source = f"http://{registry.host}/{repo}:v1"
    thin_recipe(site, out_proxy, [source])
    done = site.doit()
    assert done.returncode == 0, done.stderr + done.stdout
    assert "thin images: 1 pushed, 0 failed" in done.stdout
    _, config, doc = fetch_thin(out_proxy.host, f"thin/{repo}:v1", tmp_path)
    assert doc["version"] == "1.0" and doc["origin"] == source
    assert [x["digest"] for x in doc["layers"]] == [d[7:] for d in img.layers]
    for x in doc["layers"]:
        assert x["url"] == f"cvmfs://{site.repo}/.layers/{x['digest']}/layerfs"
        assert (site.repo_root / ".layers" / x["digest"] / "layerfs").is_dir()
    assert config["config"]["Env"] == ["A=1", "PATH=/bin", "CVMFS_IMAGE=true"]
    assert config["config"]["Entrypoint"] == ["/bin/echo"] and config["config"]["Cmd"] == ["hi"]
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert out_proxy.count("PUT", "/manifests/") == 1

    out_proxy.clear()
    again = site.doit()
    assert again.returncode == 0 and again.stdout == ""
    assert out_proxy.count("PUT") == 0 and out_proxy.count("POST") == 0

    assert site.doit("forget", f"thin:{registry.host}/{repo}:v1").returncode == 0
    forced = site.doit()
    assert forced.returncode == 0 and out_proxy.count("PUT", "/manifests/") == 1
    assert out_proxy.count("POST") == 0, "blobs already there are not uploaded again"

    out_proxy.clear()
    push(registry, layout, repo, "v1", [Entry("app", b"moved")], Env=["A=2"])
    moved = site.doit()
    assert moved.returncode == 0 and out_proxy.count("PUT", "/manifests/") == 1
    _, config, _ = fetch_thin(out_proxy.host, f"thin/{repo}:v1", tmp_path / "again")
    assert config["config"]["Env"] == ["A=2", "CVMFS_IMAGE=true"]


@pytest.mark.parametrize("password", ["wrong-password", None])
def test_bad_credentials_fail_thin_only(registry, layout, site, out_proxy, password):
    repos = [unique("nocred"), unique("nocred")]
    for repo in repos:
        push(registry, layout, repo, "v1", [Entry("x", repo.encode())])
    if password:
        site.env["DUCC_OUTPUT_REGISTRY_PASS"] = password
    else:
        del site.env["DUCC_OUTPUT_REGISTRY_PASS"]
    thin_recipe(site, out_proxy, [f"http://{registry.host}/{r}:v1" for r in repos])
    done = site.doit("-n", "1")
    assert done.returncode == 1
    assert "2 added" in done.stdout and site.revision() == 1
    assert "thin images: 0 pushed, 2 failed" in done.stdout
    assert f"unauthorized for {out_proxy.host}: pushing thin images as" in done.stdout
    assert done.stdout.count("unauthorized for") == 1, "one clear line, not one per image"
    if password is None:
        assert "no credentials are set" in done.stderr
    for repo in repos:
        assert (site.repo_root / registry.host / f"{repo}:v1").is_symlink()


def test_wildcard_pushes_one_thin_image_per_tag(registry, layout, site, out_proxy, tmp_path):
    repo = unique("wildthin")
    for tag in ("1.0", "1.1", "2.0"):
        push(registry, layout, repo, tag, [Entry("v", tag.encode())])
    thin_recipe(site, out_proxy, [f"http://{registry.host}/{repo}:1.*"])
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "thin images: 2 pushed" in done.stdout
    for tag in ("1.0", "1.1"):
        _, _, doc = fetch_thin(out_proxy.host, f"thin/{repo}:{tag}", tmp_path / tag)
        assert doc["origin"] == f"http://{registry.host}/{repo}:1.*"
    missing = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds",
                              f"{USER}:{PASSWORD}", f"docker://{out_proxy.host}/thin/{repo}:2.0"],
                             capture_output=True)
    assert missing.returncode != 0


def test_same_input_same_bytes():
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}})
    resolved = PlatformImage("linux/amd64", "sha256:" + "a" * 64, "m", b"{}",
                             "sha256:" + "b" * 64, config.encode(),
                             [Layer("sha256:" + "c" * 64, 10, "t", "sha256:" + "1" * 64)])
    one = thin.build("https://r/x:1", "repo.cern.ch", resolved)
    two = thin.build("https://r/x:1", "repo.cern.ch", resolved)
    assert (one.manifest, one.config, one.layer) == (two.manifest, two.config, two.layer)
    assert json.loads(one.thin) == {"version": "1.0", "origin": "https://r/x:1", "layers": [
        {"digest": "c" * 64, "url": "cvmfs://repo.cern.ch/.layers/" + "c" * 64 + "/layerfs"}]}
    tar = tar_bytes([])
    assert tar  # the helper still works beside thin's own tar writer


def test_push_with_token_auth_and_cross_repo_mount(token_registry, make_client):
    from helpers import creds_for

    from unpacked import reference
    client = make_client(creds_for(token_registry.host))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    resolved = PlatformImage("linux/amd64", "sha256:" + "a" * 64, "m", b"{}",
                             "sha256:" + "b" * 64, config,
                             [Layer("sha256:" + "c" * 64, 10, "t", "sha256:" + "1" * 64)])
    image = thin.build("https://r/x:1", "repo.cern.ch", resolved)
    first = reference.parse(f"http://{token_registry.host}/thin/one:1")
    assert thin.push(client, first, image) == {"layer": "uploaded", "config": "uploaded"}
    second = reference.parse(f"http://{token_registry.host}/thin/two:1")
    how = thin.push(client, second, image, mount_from="thin/one")
    assert how == {"layer": "mounted", "config": "mounted"}
    assert thin.push(client, second, image) == {"layer": "present", "config": "present"}
    scopes = [s for r in token_registry.issuer.requests for s in r["scope"]]
    assert "repository:thin/two:pull,push" in scopes and "repository:thin/one:pull" in scopes
    got = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds",
                          f"{USER}:{PASSWORD}", f"docker://{token_registry.host}/thin/two:1"],
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["Digest"] == image.digest
