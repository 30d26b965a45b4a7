"""Shared fixtures: real registries on loopback, a fault proxy, test images pushed by skopeo.

Fixtures that need a peer tool (docker-registry, skopeo, umoci, debootstrap) skip with the
reason when it is missing, so unit tests of pure modules run anywhere; CI turns those skips
into failures (UNPACKED_TEST_REQUIRE_TOOLS=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import need  # noqa: E402
from helpers.faults import FaultProxy  # noqa: E402
from helpers.hostile import HostileRegistry  # noqa: E402
from helpers.images import Layout  # noqa: E402
from helpers.registry import Registry  # noqa: E402

from unpacked.registry.client import RegistryClient  # noqa: E402


def _serve(tmp_path_factory, auth: str):
    need("docker-registry", "skopeo")
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
def hostile():
    """A registry that answers as each test tells it to, however wrongly."""
    reg = HostileRegistry()
    yield reg
    reg.stop()


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path / "layout")


@pytest.fixture
def umoci():
    need("umoci", "skopeo")


@pytest.fixture
def make_client(tmp_path):
    from helpers import FAST
    clients = []

    def make(credentials=lambda host: None, cache=True, policy=FAST):
        client = RegistryClient(tmp_path / "cache" if cache else None, policy=policy,
                                timeout=10, credentials=credentials)
        clients.append(client)
        return client
    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def bookworm(tmp_path_factory):
    """A real Debian bookworm minbase root filesystem, built once with debootstrap and cached."""
    need("debootstrap")
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
