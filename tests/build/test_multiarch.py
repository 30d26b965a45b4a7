"""Multi-platform images: every platform converted, DUCC's ``.multiarch`` layout, a CVMFS
variant symlink as the public path, aliases for ``uname -m``, GC of a dropped platform, one
platform re-flattened when only it moved, thin images tied by an OCI index."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest
from helpers import need, unique
from helpers.images import Entry, skopeo_copy, tar_bytes
from helpers.registry import PASSWORD, USER
from helpers.site import Site

PLATFORMS = [("amd64", None, "linux/amd64"), ("arm64", "v8", "linux/arm64/v8"),
             ("arm", "v7", "linux/arm/v7"), ("ppc64le", None, "linux/ppc64le")]
FOLDER = {"linux/amd64": "amd64", "linux/arm64/v8": "arm64:v8", "linux/arm/v7": "arm:v7",
          "linux/ppc64le": "ppc64le"}


def push_index(registry, layout, repo: str, tag: str = "v1", changed: str = "") -> dict:
    """An index of four platforms (and an attestation entry), each with its own files."""
    base = tar_bytes([Entry("etc/os-release", b"NAME=multi\n")])      # shared by all four
    images = {}
    for arch, variant, name in PLATFORMS:
        own = f"{arch}{variant or ''}{changed if name == 'linux/arm64/v8' else ''}".encode()
        images[name] = layout.image(f"{tag}-{arch}", [base, tar_bytes([Entry("arch", own)])],
                                    arch=arch, variant=variant, tagged=False)
    top = layout.index(tag, [images[n] for _, _, n in PLATFORMS])
    skopeo_copy(layout.path, tag, f"{registry.host}/{repo}:{tag}", all_images=True)
    return {"top": top, **images}


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    s.env["UNPACKED_PLATFORMS"] = "all"
    yield s
    s.close()


def check_multiarch(site: Site, name: str, images: dict) -> None:
    root = site.repo_root
    for platform, folder in FOLDER.items():
        img = images[platform]
        link = root / ".multiarch" / folder / name
        assert os.readlink(link) == "../" * (name.count("/") + 2) + ".flat/" + \
            img.config_digest[7:], link
        assert (link / "arch").read_bytes().startswith(folder.replace(":", "").encode())
        meta = root / ".metadata" / ".multiarch" / folder / name
        assert json.loads((meta / "image.json").read_text())["config_digest"] == \
            img.config_digest
        assert (meta / "manifest.json").read_bytes() and (meta / "config.json").read_bytes()
    aliases = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64:v8",
               "arm64": "arm64:v8", "armhf": "arm:v7", "armv7l": "arm:v7"}
    for alias, target in aliases.items():
        assert os.readlink(root / ".multiarch" / alias) == target, alias
    assert not (root / ".multiarch" / "ppc64le").is_symlink(), "a real folder, no alias"
    assert (root / ".multiarch" / "x86_64" / name / "arch").read_bytes() == b"amd64"


def test_every_platform_with_the_local_publisher(registry, layout, site):
    repo = unique("multi")
    images = push_index(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    name = f"{registry.host}/{repo}:v1"
    check_multiarch(site, name, images)
    public = site.repo_root / name
    assert os.readlink(public) == "../../.flat/" + images["linux/amd64"].config_digest[7:]
    summary = json.loads((site.repo_root / ".metadata" / name / "image.json").read_text())
    assert [p["platform"] for p in summary["platforms"]] == list(FOLDER)
    layers = {d for i in images.values() if not isinstance(i, str) for d in i.layers}
    assert len(layers) == 5 and len(os.listdir(site.repo_root / ".layers")) == 5
    assert "5 layers ingested, 4 flat images built" in done.stdout, "the base is shared"
    listing = site.doit("list", "--all").stdout
    assert f"platform:{name}#linux/arm64/v8" in listing
    assert " -> .flat/" in listing, "a listing shows the docs a bare run leaves out"
    info = site.doit("info", f"platform:{name}#linux/arm/v7")
    assert info.returncode == 0 and "linked" in info.stdout
    again = site.doit()
    assert again.returncode == 0 and again.stdout == ""


def test_the_public_path_is_a_variant_symlink_with_cvmfs(registry, layout, tmp_path):
    site = Site(tmp_path / "cv", publisher="cvmfs")
    try:
        site.env["UNPACKED_PLATFORMS"] = "linux/arm64,linux/amd64,linux/arm/v7,linux/ppc64le"
        repo = unique("variant")
        images = push_index(registry, layout, repo)
        site.recipe([f"http://{registry.host}/{repo}:v1"])
        done = site.doit()
        assert done.returncode == 0, done.stdout + done.stderr
        name = f"{registry.host}/{repo}:v1"
        assert os.readlink(site.repo_root / name) == \
            f"../../.multiarch/$(CVMFS_ARCH:-x86_64)/{name}"
        check_multiarch(site, name, images)
        assert len([c for c in site.calls() if c[0] == "publish"]) == 1, "one transaction"
        site.env["UNPACKED_CVMFS_ARCH"] = "aarch64"
        site.doit("forget", f"image:{name}")
        assert site.doit().returncode == 0
        assert "$(CVMFS_ARCH:-aarch64)" in os.readlink(site.repo_root / name)
    finally:
        site.close()


def test_a_dropped_platform_goes_and_a_moved_one_alone_is_rebuilt(registry, layout, site):
    repo = unique("drop")
    images = push_index(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    name = f"{registry.host}/{repo}:v1"
    moved = push_index(registry, layout, repo, changed="-new")
    assert moved["linux/amd64"].config_digest == images["linux/amd64"].config_digest
    done = site.doit()
    assert done.returncode == 0, done.stdout
    assert "1 flat image built" in done.stdout and "1 layer ingested" in done.stdout
    assert (site.repo_root / ".multiarch/arm64:v8" / name / "arch").read_bytes() == \
        b"arm64v8-new"
    site.env["UNPACKED_PLATFORMS"] = "linux/amd64,linux/arm64"
    dry = subprocess.run(["unpacked", "gc", "--dry-run"], env=site.env, cwd=site.base,
                         capture_output=True, text=True)
    assert "platform arm:v7/" in dry.stdout and "platform ppc64le/" in dry.stdout, dry.stdout
    done = site.doit()
    assert done.returncode == 0, done.stdout
    assert "deleted platform arm:v7/" in done.stdout and "deleted platform ppc64le/" in \
        done.stdout
    for gone in ("arm:v7", "ppc64le"):
        assert not os.path.lexists(site.repo_root / ".multiarch" / gone / name)
        assert not (site.repo_root / ".metadata/.multiarch" / gone / name).exists()
    assert (site.repo_root / ".multiarch/amd64" / name / "arch").read_bytes() == b"amd64"
    dry = subprocess.run(["unpacked", "gc", "--dry-run"], env=site.env, cwd=site.base,
                         capture_output=True, text=True)
    assert "flat image " + moved["linux/arm/v7"].config_digest[7:] in dry.stdout


def test_a_no_op_is_one_head_per_tag_and_platform_is_an_alias(registry, layout, site, proxy):
    repo = unique("noop")
    push_index(registry, layout, repo)
    site.recipe([f"http://{proxy.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    proxy.clear()
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    assert proxy.count("HEAD") == 1 and proxy.count("GET") == 0, proxy.received
    name = f"{proxy.host}/{repo}:v1"
    for i, (env, args) in enumerate([({"UNPACKED_PLATFORM": "linux/arm64/v8"}, []),
                                     ({}, ["platform=linux/arm64/v8"])]):
        alias = Site(site.base.parent / f"alias{i}")     # the deprecated single name
        alias.env.update(env)
        alias.recipe([f"http://{proxy.host}/{repo}:v1"])
        done = alias.doit(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (alias.repo_root / name / "arch").read_bytes() == b"arm64v8"
        assert not (alias.repo_root / ".multiarch").exists(), "one platform: today's layout"
        alias.close()


def test_a_platform_the_index_lacks_is_reported_not_failed(registry, layout, site):
    repo = unique("lacks")
    push_index(registry, layout, repo)
    site.env["UNPACKED_PLATFORMS"] = "linux/amd64,linux/s390x"
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not offered for linux/s390x" in done.stderr
    name = f"{registry.host}/{repo}:v1"
    assert f"platforms not offered: {name}: linux/s390x" in done.stdout + done.stderr
    assert os.readlink(site.repo_root / name).startswith("../../.flat/")
    assert not (site.repo_root / ".multiarch").exists(), "one platform: today's layout"
    site.env["UNPACKED_PLATFORMS"] = "linux/s390x"
    site.doit("forget", "--all")
    done = site.doit()
    assert done.returncode == 1 and "offers: linux/amd64" in done.stdout


def test_a_recipe_key_overrides_the_setting(registry, layout, site):
    repo = unique("key")
    push_index(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{repo}:v1"], extra="platforms: [linux/ppc64le]\n")
    assert site.doit().returncode == 0
    public = site.repo_root / registry.host / f"{repo}:v1"
    assert (public / "arch").read_bytes() == b"ppc64le"


def test_thin_images_of_every_platform_and_an_index(registry, layout, site, basic_registry,
                                                    tmp_path):
    repo = unique("thinmulti")
    images = push_index(registry, layout, repo)
    site.env["DUCC_OUTPUT_REGISTRY_PASS"] = PASSWORD
    site.recipe([f"http://{registry.host}/{repo}:v1"],
                extra=f"output_format: 'http://{basic_registry.host}/thin/$(image)'\n")
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    creds = ["--creds", f"{USER}:{PASSWORD}", "--tls-verify=false"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", *creds,
                          f"docker://{basic_registry.host}/thin/{repo}:v1"],
                         capture_output=True, text=True)
    assert raw.returncode == 0, raw.stderr
    index = json.loads(raw.stdout)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert sorted((m["platform"]["architecture"], m["platform"].get("variant", ""))
                  for m in index["manifests"]) == [("amd64", ""), ("arm", "v7"),
                                                   ("arm64", "v8"), ("ppc64le", "")]
    out = tmp_path / "arm64"
    copied = subprocess.run(["skopeo", "copy", "--quiet", "--override-arch", "arm64",
                             "--src-creds", f"{USER}:{PASSWORD}", "--src-tls-verify=false",
                             f"docker://{basic_registry.host}/thin/{repo}:v1", f"oci:{out}:x"],
                            capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    blobs = out / "blobs" / "sha256"
    manifest = json.loads((blobs / json.loads((out / "index.json").read_text())
                           ["manifests"][0]["digest"][7:]).read_text())
    with tarfile.open(blobs / manifest["layers"][0]["digest"][7:]) as tar:
        thin = json.loads(tar.extractfile("thin.json").read())
    assert [x["digest"] for x in thin["layers"]] == \
        [d[7:] for d in images["linux/arm64/v8"].layers]
    again = site.doit()
    assert again.returncode == 0 and again.stdout == "", "the same bytes: nothing pushed"


def test_a_real_runtime_starts_the_amd64_flat_image(registry, layout, site, bookworm, tmp_path):
    need("podman", "runc")
    repo = unique("podman")
    base = bookworm.read_bytes()
    amd = layout.image("amd", [base, tar_bytes([Entry("arch", b"amd64")])], tagged=False)
    arm = layout.image("arm", [tar_bytes([Entry("arch", b"arm64")])], arch="arm64",
                       variant="v8", tagged=False)
    layout.index("v1", [amd, arm])
    skopeo_copy(layout.path, "v1", f"{registry.host}/{repo}:v1", all_images=True)
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    flat = site.repo_root / ".multiarch" / "amd64" / f"{registry.host}/{repo}:v1"
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n')
    done = subprocess.run(["podman", "--runtime", "runc", "run", "--rm", "--rootfs",
                           str(flat.resolve()), "/bin/sh", "-c",
                           ". /etc/os-release && echo $ID $(cat /arch)"],
                          env={**os.environ, "CONTAINERS_CONF": str(conf)},
                          capture_output=True, text=True, timeout=300)
    if done.returncode and "cannot" in done.stderr.lower() and "namespace" in done.stderr:
        pytest.skip(f"podman cannot run containers here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["debian", "amd64"]
