"""Apptainer sandbox files: environment, runscript, layout; executed with sh and in a chroot."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import unique
from helpers.images import Entry, Layout, skopeo_copy, tar_bytes

from unpacked import reference
from unpacked.image import convert, sandbox
from unpacked.registry.documents import ImageConfig
from unpacked.repo.fs import Dir
from unpacked.repo.layout import Repository

TRICKY_ENV = ["PATH=/opt/my bin:/usr/bin:/bin", "DOLLAR=$HOME and ${X:-y}",
              'QUOTES=say "hi" and \'bye\'', "BACK=a\\b\\\\c", "TICK=`id`", "BRACE=a}b{c",
              "EMPTY=", "EQ=a=b=c", "NL=line1\nline2", "BARE", "1BAD=skipped", "BAD-NAME=x"]


def sourced(script: Path, preset: dict | None = None) -> dict[str, str]:
    """The environment after ``sh`` sources ``script`` with an empty starting environment."""
    env = {"PATH": "/usr/bin:/bin", **(preset or {})}
    command = f'. "{script}"; /usr/bin/env -0'
    out = subprocess.run(["/bin/sh", "-c", command], env=env, check=True,
                         capture_output=True).stdout
    pairs = [item.split(b"=", 1) for item in out.split(b"\0") if item]
    return {k.decode(): v.decode() for k, v in pairs if k not in (b"PWD", b"SHLVL", b"_")}


def test_env_script_reproduces_tricky_values(tmp_path):
    script = tmp_path / "10-docker2singularity.sh"
    script.write_text(sandbox.env_script(TRICKY_ENV))
    expected = {}
    for item in TRICKY_ENV:
        name, _, value = item.partition("=")
        if sandbox.ENV_NAME.match(name):
            expected[name] = value
    assert sourced(script) == expected
    # Values from the host win except PATH, which the image sets outright (Apptainer's rule).
    got = sourced(script, {"DOLLAR": "host", "PATH": "/host/bin"})
    assert got["DOLLAR"] == "host" and got["PATH"] == "/opt/my bin:/usr/bin:/bin"


@pytest.mark.parametrize("entrypoint, cmd, args, expected", [
    (["/bin/echo", "from-entrypoint"], ["default", "args"], [], "from-entrypoint default args"),
    (["/bin/echo", "from-entrypoint"], ["default"], ["given", "two"], "from-entrypoint given two"),
    (None, ["/bin/echo", "cmd only"], [], "cmd only"),
    (None, ["/bin/echo", "cmd only"], ["/bin/echo", "replaced"], "replaced"),
    (["/bin/echo"], None, ["a b", "it's"], "a b it's"),
    (["/bin/echo"], ["$HOME", '"q"'], [], '$HOME "q"'),
])
def test_runscript_semantics(tmp_path, entrypoint, cmd, args, expected):
    script = tmp_path / "runscript"
    script.write_text(sandbox.runscript(entrypoint, cmd))
    out = subprocess.run(["sh", str(script), *args], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/home/x"})
    assert out.stdout.strip() == expected
    exact = subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                           check=True, env={"PATH": "/usr/bin:/bin", "APPTAINER_NO_EVAL": "1"})
    assert exact.stdout.strip() == expected


def test_layout_of_the_sandbox(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), root / "tmp")          # the image's /tmp points elsewhere
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("image hosts")
    cfg = ImageConfig("linux", "amd64", "", (), env=("A=1",), cmd=("/bin/sh",),
                      labels={"org.x": "y"}, working_dir="/work", user="1000")
    with Dir.root(root) as folder:
        sandbox.write(folder, cfg)
    for rel in sandbox.DIRS:
        if rel != "tmp":
            assert (root / rel).is_dir() and not (root / rel).is_symlink(), rel
    assert os.readlink(root / "tmp") == str(outside) and os.listdir(outside) == []
    for name, target in sandbox.LINKS.items():
        assert os.readlink(root / name) == target
        assert (root / name).resolve().relative_to(root.resolve())
    assert (root / "etc/hosts").read_text() == "" and (root / "etc/resolv.conf").read_text() == ""
    assert stat.S_IMODE((root / "etc/hosts").stat().st_mode) == 0o644
    d = root / ".singularity.d"
    for rel in ("actions/exec", "actions/run", "actions/shell", "actions/start", "actions/test",
                "env/01-base.sh", "env/10-docker2singularity.sh", "env/90-environment.sh",
                "env/95-apps.sh", "env/99-base.sh", "env/99-runtimevars.sh", "runscript",
                "startscript"):
        assert stat.S_IMODE((d / rel).stat().st_mode) == 0o755, rel
        assert (d / rel).read_text().startswith("#!/bin/sh"), rel
        subprocess.run(["sh", "-n", str(d / rel)], check=True)
    assert json.loads((d / "labels.json").read_text()) == {"org.x": "y"}
    assert 'eval "set ${SINGULARITY_OCI_RUN}"' in (d / "runscript").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chroot"), reason="needs chroot")
def test_runs_in_a_chroot_of_the_flat_tree(registry, tmp_path, make_client, bookworm):
    layout = Layout(tmp_path / "layout")
    extra = tar_bytes([Entry("opt/app/hello", b"#!/bin/sh\necho \"hello $GREETING $*\"\n",
                             mode=0o755)])
    layout.image("v1", [bookworm.read_bytes(), extra],
                 config={"Env": ["PATH=/opt/app:/usr/bin:/bin", "GREETING=from image"],
                         "Entrypoint": ["hello"], "Cmd": ["default"]})
    repo_name = unique("chroot")
    skopeo_copy(layout.path, "v1", f"{registry.host}/{repo_name}:v1")
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    client = make_client()
    image = client.resolve(ref, ("linux/amd64",)).images[0]
    repo = Repository(tmp_path / "cvmfs")
    for layer in image.layers:
        convert.ingest_layer(client, [(ref, layer)], repo)
    convert.build_flat(repo, ref.name, image, "hardlink")
    flat = repo.flat_dir(image.config_digest)

    def chroot(*args):
        return subprocess.run([shutil.which("chroot"), str(flat), *args], capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert chroot("/.singularity.d/actions/run").stdout.strip() == "hello from image default"
    assert chroot("/.singularity.d/actions/run", "a", "b").stdout.strip() == "hello from image a b"
    got = chroot("/.singularity.d/actions/exec", "/bin/sh", "-c", 'echo "$PATH|$GREETING"')
    assert got.stdout.strip().startswith("/opt/app:/usr/bin:/bin|from image")
