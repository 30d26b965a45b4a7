"""Pipeline scenarios shared by the end-to-end tests: images on a base, slow runs to interrupt."""

from __future__ import annotations

import os
import time

from . import unique
from .images import Entry, skopeo_copy, tar_bytes

BASE = [Entry("etc/os-release", b"NAME=test\n"), Entry("usr/bin/tool", b"#!/bin/sh\n",
                                                       mode=0o755),
        Entry("usr/share/doc/readme", b"doc"), Entry("var/cache/junk", b"junk")]


def push(registry, layout, repo: str, tag: str, own: list[Entry], base=BASE, **config):
    img = layout.image(tag, [tar_bytes(base), tar_bytes(own)], config=config or None)
    skopeo_copy(layout.path, tag, f"{registry.host}/{repo}:{tag}")
    return img


def wait_for(predicate, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def temps(site):
    layers = site.repo_root / ".layers"
    return [n for n in os.listdir(layers) if n.startswith(".")] if layers.exists() else []


def start_slow(registry, layout, site, proxy, repo: str, size: int, delay: float,
               also: tuple[str, ...] = ()):
    """Start a run whose image has a big layer served slowly; return once its ingest is
    under way (``also``: more inputs of the recipe, listed first)."""
    img = push(registry, layout, repo, "v1", [Entry("big", os.urandom(size))])
    proxy.add(f"/blobs/{img.layers[1]}", "slow", at=65536, delay=delay)
    site.recipe([*also, f"http://{proxy.host}/{repo}:v1"])
    run = site.start()
    assert wait_for(lambda: temps(site)), "the ingest never started"
    return img, run


def run_interrupted_later(registry, layout, site, proxy, snapshot):
    """Convert one image, then start a run that adds a slow second one and wait until its
    ingest is under way; returns ``snapshot()`` of the first state and the running doit."""
    first = unique("first")
    push(registry, layout, first, "v1", [Entry("a", b"a")])
    site.recipe([f"http://{proxy.host}/{first}:v1"])
    assert site.doit().returncode == 0
    before = snapshot()
    _, run = start_slow(registry, layout, site, proxy, unique("term"), 2 << 20, 0.05,
                        also=(f"http://{proxy.host}/{first}:v1",))
    time.sleep(0.3)
    return before, run
