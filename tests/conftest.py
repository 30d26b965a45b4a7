"""Shared fixtures: real registries on loopback, a fault proxy, test images pushed by skopeo."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faults import FaultProxy  # noqa: E402
from images import Entry, Layout, skopeo_copy, tar_bytes  # noqa: E402
from registry import PASSWORD, USER, Registry  # noqa: E402

from unpacked.registry.auth import Credential  # noqa: E402
from unpacked.registry.client import RegistryClient  # noqa: E402
from unpacked.registry.retry import RetryPolicy  # noqa: E402

for tool in ("docker-registry", "skopeo", "umoci"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is missing: run .ci/run (apt-get install {tool})")

FAST = RetryPolicy(attempts=4, seconds=20, base=0.01, cap=0.05)
_names = itertools.count()


def unique(prefix: str = "img") -> str:
    return f"test/{prefix}{next(_names)}"


def _serve(tmp_path_factory, auth: str):
    reg = Registry(tmp_path_factory.mktemp(f"reg-{auth}"), auth)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    yield from _serve(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    yield from _serve(tmp_path_factory, "basic")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    yield from _serve(tmp_path_factory, "token")


@pytest.fixture(scope="session")
def _proxy(registry):
    proxy = FaultProxy(registry.host)
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(_proxy):
    _proxy.clear()
    yield _proxy
    _proxy.clear()


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path / "layout")


def creds_for(*hosts: str):
    """A credential lookup that knows the test user on ``hosts`` only."""
    def lookup(host: str):
        return Credential(USER, PASSWORD) if host in hosts else None
    return lookup


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(credentials=lambda host: None, cache=True, policy=FAST):
        client = RegistryClient(tmp_path / "cache" if cache else None, policy=policy,
                                timeout=10, credentials=credentials)
        clients.append(client)
        return client
    yield make
    for c in clients:
        c.close()


def push_simple(reg: Registry, layout: Layout, repo: str, tag: str = "v1",
                files: dict[str, bytes] | None = None, **kw):
    """Build a one-layer image with ``files`` and push it; returns the Image."""
    files = files or {"hello.txt": f"{repo}:{tag}".encode()}
    layer = tar_bytes([Entry(name, data) for name, data in files.items()])
    img = layout.image(tag, [layer], **kw)
    skopeo_copy(layout.path, tag, f"{reg.host}/{repo}:{tag}", reg.creds)
    return img


@pytest.fixture(scope="session")
def bookworm(tmp_path_factory):
    """A real Debian bookworm minbase root filesystem, built once with debootstrap and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unpacked-tests"
    archive = cache / "bookworm-minbase.tar"
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        root = tmp_path_factory.mktemp("debootstrap") / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)],
                       check=True, capture_output=True, timeout=1800)
        partial = archive.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf",
                        str(partial), "."], check=True, timeout=600)
        partial.rename(archive)
    return archive
