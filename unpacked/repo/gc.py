"""Garbage collection: what to delete, and when (the seed left it open; OSG and DUCC agree).

- An image dropped from every recipe loses its public path and metadata after
  ``gc_image_grace`` days (default 0: at once, as OSG does; nothing else goes with it).
- A flat image no kept image and no symlink of the public tree names is deleted ``gc_grace``
  days (default 7) after it lost its last reference; likewise a layer that no kept image,
  no image in its grace period, and no thin image still in use names. Running jobs hold
  paths, so nothing goes at once.
- An image whose tag is gone upstream (404, or gone from a wildcard's listing) is reported
  and kept, unless ``gc_prune_gone`` asks for it to be removed like a dropped image.
- At most ``gc_max_deletions`` deletions a run (default 50: deletions inside a CVMFS
  transaction are slow), oldest first; the rest are reported as pending.

When each object lost its last reference is kept in ``cache/gc/``: if the cache is lost, the
clocks restart, so nothing ever goes sooner than its grace period.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .fs import is_temp, remove_tree, write_atomic
from .layout import Repository, hex_of, read_json

log = logging.getLogger(__name__)
DAY = 86400.0


@dataclass
class Existing:
    """A converted image, as its ``.metadata/<name>/image.json`` records it."""

    name: str
    public: str
    config: str
    layers: list[str]
    previous_layers: list[str]


@dataclass
class Wants:
    """What the recipes want in one repository now (from the resolved state)."""

    names: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)               # 404 at the last resolve
    wildcards: list[tuple[str, str, str]] = field(default_factory=list)  # registry, repo, glob
    flats: set[str] = field(default_factory=set)              # config digests
    layers: set[str] = field(default_factory=set)
    thin_pending: set[str] = field(default_factory=set)       # thin image not pushed as is
    roots: set[str] = field(default_factory=set)              # dot-folders public paths use


@dataclass
class Candidate:
    kind: str            # image, flat, layer
    id: str              # image name, or digest
    reason: str
    since: float
    due: float
    public: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass
class Plan:
    repo: str
    due: list[Candidate] = field(default_factory=list)
    pending: list[Candidate] = field(default_factory=list)
    waiting: list[Candidate] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


_SCANNED: dict[str, tuple[tuple[int, int], Existing]] = {}


def scan_images(repo: Repository) -> dict[str, Existing]:
    """Every converted image of the repository, from its metadata (files re-read only when
    they changed: a run scans several times)."""
    found: dict[str, Existing] = {}
    top = repo.root / ".metadata"
    if not top.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not is_temp(d)]
        if "image.json" not in filenames:
            continue
        dirnames[:] = []
        path = os.path.join(dirpath, "image.json")
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamp = (st.st_mtime_ns, st.st_ino)
        cached = _SCANNED.get(path)
        if cached and cached[0] == stamp:
            found[cached[1].name] = cached[1]
            continue
        info = read_json(Path(path)) or {}
        name = os.path.relpath(dirpath, top)
        image = Existing(name, info.get("public_path", ""), info.get("config_digest", ""),
                         info.get("layers", []), info.get("previous_layers", []))
        _SCANNED[path] = (stamp, image)
        found[name] = image
    return found


def linked_flats(repo: Repository, extra_roots: set[str]) -> set[str]:
    """Config digests of flat images that any symlink of the public tree points at, made by
    us or not (a repository DUCC wrote, a link an operator made by hand)."""
    found: set[str] = set()
    if not repo.root.is_dir():
        return found
    tops = [e.name for e in os.scandir(repo.root)
            if e.is_dir(follow_symlinks=False) and (not e.name.startswith(".")
                                                    or e.name in extra_roots)]
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(repo.root / top):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full):
                    continue
                target = os.path.normpath(os.path.join(dirpath, os.readlink(full)))
                flat = os.path.relpath(target, repo.root).split(os.sep)
                if len(flat) >= 2 and flat[0] == ".flat":
                    found.add("sha256:" + flat[1])
    return found


def scan_digests(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted("sha256:" + e.name for e in os.scandir(folder)
                  if not is_temp(e.name) and e.is_dir(follow_symlinks=False))


class Clocks:
    """When each object was first seen without a reference, per repository, in cache/gc/."""

    def __init__(self, cache_dir: Path, repo: str):
        self.path = cache_dir / "gc" / f"{repo}.json"

    def load(self) -> dict[str, float]:
        return read_json(self.path) or {}

    def save(self, clocks: dict[str, float]) -> None:
        write_atomic(self.path, json.dumps(clocks, sort_keys=True).encode(), 0o600)


def _matches_wildcard(name: str, wildcards) -> bool:
    base, _, tag = name.rpartition(":")
    for registry, repository, pattern in wildcards:
        if base == f"{registry}/{repository}" and fnmatch.fnmatchcase(tag, pattern):
            return True
    return False


def compute(repo: Repository, name: str, wants: Wants, clocks: dict[str, float], now: float,
            grace: float, image_grace: float, limit: int, prune_gone: bool) -> Plan:
    """What is due, pending and waiting; ``clocks`` is updated in place."""
    plan = Plan(name)
    existing = scan_images(repo)
    candidates: list[Candidate] = []
    kept: list[Existing] = []

    def candidate(kind, ident, reason, days, public=""):
        key = f"{kind}:{ident}"
        since = clocks.setdefault(key, now)
        return Candidate(kind, ident, reason, since, since + days * DAY, public)

    for image in existing.values():
        if image.name in wants.names and image.name not in wants.gone:
            kept.append(image)
            continue
        gone = image.name in wants.gone or _matches_wildcard(image.name, wants.wildcards)
        if gone and not prune_gone:
            plan.gone.append(image.name)
            kept.append(image)
            continue
        why = "gone upstream, pruning asked for" if gone else "dropped from every recipe"
        c = candidate("image", image.name, why, image_grace, image.public)
        candidates.append(c)
        if c.due > now:
            kept.append(image)        # in its grace period: its flat image and layers stay
    flats = set(wants.flats) | {i.config for i in kept} | linked_flats(repo, wants.roots)
    layers = set(wants.layers)
    for image in kept:
        layers.update(image.layers)
        if image.name in wants.thin_pending:
            layers.update(image.previous_layers)   # the thin image in the registry names them
    for digest in scan_digests(repo.root / ".flat"):
        if digest not in flats:
            candidates.append(candidate("flat", digest, "no image names it", grace))
    for digest in scan_digests(repo.root / ".layers"):
        if digest not in layers:
            candidates.append(candidate("layer", digest, "no kept image uses it", grace))
    live = {c.key for c in candidates}
    for key in [k for k in clocks if k not in live]:
        del clocks[key]                   # referenced again (or gone): its clock restarts
    due = sorted((c for c in candidates if c.due <= now), key=lambda c: (c.since, c.key))
    plan.due, plan.pending = due[:limit], due[limit:]
    plan.waiting = sorted((c for c in candidates if c.due > now), key=lambda c: c.due)
    return plan


def delete(repo: Repository, c: Candidate) -> None:
    """Delete one object inside the open transaction; never follows a symlink out."""
    if c.kind == "image":
        if c.public:
            link = repo.public(c.public)
            if os.path.islink(link):
                if repo.guard:
                    repo.guard(link)
                if os.path.lexists(link):
                    os.unlink(link)
                _prune_parents(repo.root, link.parent)
        target = repo.metadata_dir(c.id)
        _prune_parents(repo.root / ".metadata", _remove(repo, target).parent)
    elif c.kind == "flat":
        _remove(repo, repo.flat_dir(c.id))
    else:
        _remove(repo, repo.layer_dir(c.id))


def _remove(repo: Repository, path: Path) -> Path:
    if os.path.lexists(path):
        if repo.guard:
            repo.guard(path)          # local publisher: moved aside, gone at publish
        remove_tree(path)
    return path


def _prune_parents(stop: Path, folder: Path) -> None:
    """Remove folders left empty, up to (not including) ``stop``."""
    stop = stop.resolve()
    while folder.resolve() != stop and stop in folder.resolve().parents:
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = folder.parent


def describe(c: Candidate, now: float) -> str:
    what = {"image": "image", "flat": "flat image", "layer": "layer"}[c.kind]
    ident = c.id if c.kind == "image" else hex_of(c.id)
    age = (now - c.since) / DAY
    return f"{what} {ident}: {c.reason} for {age:.1f} days"
