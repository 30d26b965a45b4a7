"""What many test modules share: unique names, pushing a small image, tool requirements."""

from __future__ import annotations

import itertools
import os
import re
import shutil

import pytest

from unpacked.registry.auth import Credential
from unpacked.registry.retry import RetryPolicy

from .images import Entry, Layout, skopeo_copy, tar_bytes
from .registry import PASSWORD, USER, Registry

FAST = RetryPolicy(attempts=4, seconds=20, base=0.01, cap=0.05)
REQUIRE = "UNPACKED_TEST_REQUIRE_TOOLS"
_names = itertools.count()


STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")


def unstamped(text: str) -> list[str]:
    """The lines of a cron run's output without their ISO-8601 timestamps."""
    return [STAMP.sub("", line, count=1) for line in text.splitlines()]


def need(*tools: str) -> None:
    """Skip (with the reason) when a peer tool is missing; CI sets UNPACKED_TEST_REQUIRE_TOOLS
    so that a missing tool fails instead of skipping."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (apt-get install {' '.join(missing)}; .ci/run does)"
    if os.environ.get(REQUIRE):
        pytest.fail(reason)
    pytest.skip(reason)


def unique(prefix: str = "img") -> str:
    return f"test/{prefix}{next(_names)}"


def creds_for(*hosts: str):
    """A credential lookup that knows the test user on ``hosts`` only."""
    def lookup(host: str):
        return Credential(USER, PASSWORD) if host in hosts else None
    return lookup


def push_simple(reg: Registry, layout: Layout, repo: str, tag: str = "v1",
                files: dict[str, bytes] | None = None, **kw):
    """Build a one-layer image with ``files`` and push it; returns the Image."""
    files = files or {"hello.txt": f"{repo}:{tag}".encode()}
    layer = tar_bytes([Entry(name, data) for name, data in files.items()])
    img = layout.image(tag, [layer], **kw)
    skopeo_copy(layout.path, tag, f"{reg.host}/{repo}:{tag}", reg.creds)
    return img
