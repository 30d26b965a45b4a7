"""The ``unpacked`` console script: check and manifest, exit codes, no tracebacks."""

import json
import subprocess

from helpers import push_simple, unique


def run(*args, env=None):
    return subprocess.run(["unpacked", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_check_prints_one_line_per_image(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nuser: u\ncvmfs_repo: r.cern.ch\n"
                    "output_format: 'https://reg.example/thin/$(image)'\n"
                    "input:\n  - fedora\n  - 'https://ghcr.io/org/img:1.*'\n")
    done = run("check", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:6: fedora -> https://docker.io/library/fedora:latest")
    assert "api=registry-1.docker.io" in lines[0]
    assert "thin=https://reg.example/thin/library/fedora:latest" in lines[0]
    assert "(wildcard)" in lines[1]


def test_check_errors_exit_nonzero_without_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\ncvmfs_repo: r.cern.ch\ninput:\n  - Fedora\n")
    done = run("check", str(path))
    assert done.returncode == 3                 # a bad recipe: README's exit code 3
    assert done.stderr.startswith(f"error: {path}:4: input: 'Fedora'")
    assert "Traceback" not in done.stderr


def test_manifest_prints_resolved_image(registry, layout, tmp_path):
    repo = unique()
    img = push_simple(registry, layout, repo, config={"Entrypoint": ["/bin/echo", "hi"]})
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "UNPACKED_CACHE": str(tmp_path / "cache")}
    import os
    env["PATH"] = os.environ["PATH"]
    done = run("manifest", f"http://{registry.host}/{repo}:v1", env=env)
    assert done.returncode == 0, done.stderr
    assert img.manifest_digest in done.stdout and img.config_digest in done.stdout
    assert img.layers[0] in done.stdout and '["/bin/echo", "hi"]' in done.stdout
    done = run("manifest", "--json", f"http://{registry.host}/{repo}:v1", env=env)
    doc = json.loads(done.stdout)
    assert doc["images"][0]["config"]["config"]["Entrypoint"] == ["/bin/echo", "hi"]
    done = run("manifest", f"http://{registry.host}/{repo}:missing", env=env)
    assert done.returncode == 1 and "MANIFEST_UNKNOWN" in done.stderr
    assert "Traceback" not in done.stderr


def test_manifest_says_what_an_image_offers(registry, layout, tmp_path):
    import os

    from helpers.images import Entry, skopeo_copy, tar_bytes
    env = {**os.environ, "HOME": str(tmp_path), "UNPACKED_CACHE": str(tmp_path / "cache")}
    single = unique()
    push_simple(registry, layout, single)
    done = run("manifest", "--platform", "linux/arm64", f"http://{registry.host}/{single}:v1",
               env=env)
    assert done.returncode == 1
    assert "a single-platform image for linux/amd64, not linux/arm64" in done.stderr
    multi = unique("offers")
    amd = layout.image("a", [tar_bytes([Entry("x", b"a")])], tagged=False)
    arm = layout.image("b", [tar_bytes([Entry("x", b"b")])], arch="arm64", variant="v8",
                       tagged=False)
    layout.index("v1", [amd, arm])
    skopeo_copy(layout.path, "v1", f"{registry.host}/{multi}:v1", all_images=True)
    done = run("manifest", "--platform", "all", f"http://{registry.host}/{multi}:v1", env=env)
    assert done.returncode == 0, done.stderr
    assert "offers:    linux/amd64, linux/arm64/v8" in done.stdout
    assert done.stdout.count("platform:  ") == 2
