"""Garbage collection: what to delete, and when (the seed left it open; OSG and DUCC agree).

- An image dropped from every recipe loses its public path and metadata after
  ``gc_image_grace`` days (default 0: at once, as OSG does; nothing else goes with it). So
  does a public path an image was published at before its recipe's ``public_path`` changed.
- A flat image no kept image and no symlink of the public tree names is deleted ``gc_grace``
  days (default 7) after it lost its last reference; likewise a layer that no kept image,
  no image in its grace period, and no thin image still in use names. Running jobs hold
  paths, so nothing goes at once.
- An image whose tag is gone upstream (404, or gone from a wildcard's listing) is reported
  and kept, unless ``gc_prune_gone`` asks for it to be removed like a dropped image.
- A public path that an image still wanted owns is never removed, whatever else names it.
- At most ``gc_max_deletions`` deletions a run (default 50: deletions inside a CVMFS
  transaction are slow), oldest first; the rest are reported as pending.

When each object lost its last reference is kept in ``cache/gc/``: if the cache is lost, the
clocks restart, so nothing ever goes sooner than its grace period. Everything is read and
deleted through ``repo.fs``: a symlink in the repository is never followed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UnpackedError
from ..reference import is_digest
from .fs import Dir, is_temp, write_local
from .layout import FLAT, LAYERS, METADATA, MULTIARCH, STATE, Repository, check_rel, hex_of

log = logging.getLogger(__name__)
DAY = 86400.0
OWN = {LAYERS, FLAT, METADATA, STATE}       # folders whose symlinks are not references


@dataclass
class Existing:
    """A converted image, as its ``.metadata/<name>/image.json`` records it."""

    name: str
    public: str
    config: str
    layers: list[str]
    previous_layers: list[str]
    previous_publics: list[str] = field(default_factory=list)


@dataclass
class Wants:
    """What the recipes want in one repository now (from the resolved state)."""

    names: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)               # 404 at the last resolve
    wildcards: list[tuple[str, str, str]] = field(default_factory=list)  # registry, repo, glob
    flats: set[str] = field(default_factory=set)              # config digests
    layers: set[str] = field(default_factory=set)
    publics: dict[str, set[str]] = field(default_factory=dict)   # name -> its public paths
    platforms: set[str] = field(default_factory=set)          # "<arch>/<name>" wanted
    frozen: list[str] = field(default_factory=list)           # why no image may go now
    thin_pending: set[str] = field(default_factory=set)       # thin image not pushed as is


@dataclass
class Candidate:
    kind: str            # image, public, flat, layer
    id: str              # image name, public path, or digest
    reason: str
    since: float
    due: float
    public: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass
class Collection:
    """The garbage collection of one repository at one moment."""

    repo: str
    due: list[Candidate] = field(default_factory=list)
    pending: list[Candidate] = field(default_factory=list)
    waiting: list[Candidate] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    protected: set[str] = field(default_factory=set)     # public paths never removed
    blocked: str = ""                                     # why no image was unpublished


def _read_image(folder: Dir, name: str) -> Existing | None:
    try:
        info = json.loads(folder.read_bytes("image.json") or b"null")
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    strings = lambda key: [x for x in info.get(key) or [] if isinstance(x, str)]  # noqa: E731
    public = info.get("public_path")
    return Existing(name, public if isinstance(public, str) else "",
                    info.get("config_digest") if is_digest(info.get("config_digest")) else "",
                    [x for x in strings("layers") if is_digest(x)],
                    [x for x in strings("previous_layers") if is_digest(x)],
                    strings("previous_public_paths"))


def scan_images(repo: Repository, under: str = "") -> dict[str, Existing]:
    """Every converted image of the repository, from its metadata: by name (``under``
    empty), or a multi-platform image's platforms as ``<arch>/<name>`` (``under`` is
    ``.multiarch``)."""
    found: dict[str, Existing] = {}
    base = f"{METADATA}/{under}".rstrip("/")
    try:
        root = repo.open()
    except UnpackedError:
        return found
    with root:
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                folder = root.sub(f"{base}/{rel}".rstrip("/"))
            except (UnpackedError, OSError):
                continue
            with folder:
                if rel and folder.lstat("image.json") is not None:
                    image = _read_image(folder, rel)
                    if image is not None:
                        found[rel] = image
                    continue
                for entry in folder.scandir():
                    if is_temp(entry.name) or not entry.is_dir(follow_symlinks=False) or \
                            (not rel and not under and entry.name == MULTIARCH):
                        continue
                    stack.append(f"{rel}/{entry.name}".lstrip("/"))
    return found


@dataclass
class Survey:
    """The converted images of a repository, from its metadata (``scan_images``): reading
    ten thousand ``image.json`` files costs seconds, so a survey is kept in ``cache/gc/`` for
    the published revision it was read at. The metadata changes only inside transactions,
    and each publish makes a new revision; a survey is never kept while one is open."""

    images: dict[str, Existing]
    platforms: dict[str, Existing]

    @classmethod
    def read(cls, repo: Repository) -> Survey:
        return cls(scan_images(repo), scan_images(repo, MULTIARCH))

    @classmethod
    def cached(cls, repo: Repository, path: Path, stamp_now: Callable[[], list],
               remember: bool = True) -> Survey:
        """The survey for the repository's stamp (revision and identity), read again when the
        cached one is for another. An empty stamp is never cached, nor a scan during which
        the stamp changed (a transaction opened meanwhile)."""
        stamp = stamp_now()
        if stamp:
            try:
                doc = json.loads(path.read_text())
                if doc.get("stamp") == stamp and doc.get("version") == 1:
                    return cls({k: Existing(**v) for k, v in doc["images"].items()},
                               {k: Existing(**v) for k, v in doc["platforms"].items()})
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                pass
        survey = cls.read(repo)
        if remember and stamp and stamp_now() == stamp:
            survey._store(path, stamp)
        return survey

    def _store(self, path: Path, stamp: list) -> None:
        doc = {"version": 1, "stamp": stamp,
               "images": {k: asdict(v) for k, v in self.images.items()},
               "platforms": {k: asdict(v) for k, v in self.platforms.items()}}
        with contextlib.suppress(OSError, UnpackedError):     # only a cache: never fatal
            write_local(path, json.dumps(doc))


def _flat_of(link_dir: str, target: str) -> str | None:
    """The config digest a symlink at ``link_dir`` names through ``.flat/<hex>``, if any."""
    path = posixpath.normpath(posixpath.join(link_dir, target))
    parts = path.split("/")
    if len(parts) >= 2 and parts[0] == FLAT:
        digest = "sha256:" + parts[1]
        return digest if is_digest(digest) else None
    return None


def linked(repo: Repository) -> tuple[set[str], set[str]]:
    """Config digests of flat images any symlink of the repository points at (outside the
    repository's own folders: public paths, ``.multiarch``, links an operator made, a
    repository DUCC wrote), and the paths holding such symlinks."""
    flats: set[str] = set()
    links: set[str] = set()
    try:
        root = repo.open()
    except UnpackedError:
        return flats, links
    with root:
        stack = []
        for entry in root.scandir():
            if entry.name in OWN or is_temp(entry.name):
                continue
            if entry.is_symlink():
                digest = _flat_of("", root.readlink(entry.name) or "")
                if digest:
                    flats.add(digest)
                    links.add(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.name)
        while stack:
            rel = stack.pop()
            with root.sub(rel) as folder:
                for entry in folder.scandir():
                    path = f"{rel}/{entry.name}"
                    if entry.is_symlink():
                        digest = _flat_of(rel, folder.readlink(entry.name) or "")
                        if digest:
                            flats.add(digest)
                            links.add(path)
                    elif entry.is_dir(follow_symlinks=False) and not is_temp(entry.name):
                        stack.append(path)
    return flats, links


def scan_digests(repo: Repository, area: str) -> list[str]:
    try:
        with repo.open_area(area, create=False) as folder:
            return sorted("sha256:" + e.name for e in folder.scandir()
                          if not is_temp(e.name) and e.is_dir(follow_symlinks=False)
                          and is_digest("sha256:" + e.name))
    except FileNotFoundError:
        return []


class Clocks:
    """When each object was first seen without a reference, per repository, in cache/gc/."""

    def __init__(self, cache_dir: Path, repo: str):
        self.path = cache_dir / "gc" / f"{repo}.json"

    def load(self) -> dict[str, float]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in doc.items() if isinstance(v, int | float)} \
            if isinstance(doc, dict) else {}

    def save(self, clocks: dict[str, float]) -> None:
        write_local(self.path, json.dumps(clocks, sort_keys=True))


def _matches_wildcard(name: str, wildcards) -> bool:
    base, _, tag = name.rpartition(":")
    return any(base == f"{registry}/{repository}" and fnmatch.fnmatchcase(tag, pattern)
               for registry, repository, pattern in wildcards)


@dataclass
class Policy:
    """The knobs of a collection (from the run's settings)."""

    grace: float
    image_grace: float
    limit: int
    prune_gone: bool
    max_dropped: int | None = None       # None: 10, and never more than a tenth
    now: float = 0.0                     # the moment the collection is worked out for


class _Collect:
    """One computation of ``compute``: what stays (``kept``), what may go (``candidates``)."""

    def __init__(self, repo: Repository, wants: Wants, clocks: dict[str, float], now: float,
                 knobs: Policy, result: Collection):
        self.repo, self.wants, self.clocks, self.now = repo, wants, clocks, now
        self.knobs, self.result = knobs, result
        self.kept: list[Existing] = []
        self.candidates: list[Candidate] = []

    def candidate(self, kind: str, ident: str, reason: str, days: float,
                  public: str = "") -> Candidate:
        since = self.clocks.setdefault(f"{kind}:{ident}", self.now)
        return Candidate(kind, ident, reason, since, since + max(days, 0.0) * DAY, public)

    def images(self, existing: dict[str, Existing]) -> None:
        """Wanted images stay; dropped ones go after their grace, unless too many at once."""
        wants, knobs, result = self.wants, self.knobs, self.result
        dropping: list[tuple[Candidate, Existing]] = []
        for image in existing.values():
            if (image.name in wants.names and image.name not in wants.gone) or wants.frozen:
                self.kept.append(image)
                continue
            gone = image.name in wants.gone or _matches_wildcard(image.name, wants.wildcards)
            if gone and not knobs.prune_gone:
                result.gone.append(image.name)
                self.kept.append(image)
                continue
            why = "gone upstream, pruning asked for" if gone else "dropped from every recipe"
            dropping.append((self.candidate("image", image.name, why, knobs.image_grace,
                                            image.public), image))
        due_now = [c for c, _ in dropping if c.due <= self.now]
        limit = knobs.max_dropped if knobs.max_dropped is not None \
            else min(10, max(1, len(existing) // 10))
        if len(due_now) > limit:
            result.blocked = (f"{len(due_now)} of {len(existing)} published images would be "
                              f"unpublished at once, more than {limit} (gc_max_dropped): none "
                              "is; check the recipes, or raise gc_max_dropped")
        for c, image in dropping:
            if c.due > self.now or result.blocked:
                self.kept.append(image)    # in its grace period (or held): flat, layers stay
            if not result.blocked:
                self.candidates.append(c)
        if wants.frozen:
            result.blocked = "; ".join(wants.frozen)

    def platforms(self, entries: dict[str, Existing]) -> None:
        """Platforms of multi-platform images (``<arch>/<name>``) no longer asked for."""
        for entry in entries.values():
            if entry.name in self.wants.platforms or self.result.blocked:
                self.kept.append(entry)
                continue
            arch, _, image_name = entry.name.partition("/")
            c = self.candidate("platform", entry.name, f"platform {arch} no longer wanted "
                               f"for {image_name}", self.knobs.image_grace)
            self.candidates.append(c)
            if c.due > self.now:
                self.kept.append(entry)

    def publics(self) -> set[str]:
        """Public paths a kept image was published at before: they go; wanted ones never."""
        pruned = self.wants.gone if self.knobs.prune_gone else set()
        protected = {p for name, paths in self.wants.publics.items() if name not in pruned
                     for p in paths} | {i.public for i in self.kept}
        for image in self.kept:
            for old in image.previous_publics:
                if old not in protected and self.repo.link_target(old) is not None:
                    self.candidates.append(self.candidate(
                        "public", old, f"{image.name} moved to {image.public}",
                        self.knobs.image_grace))
        return protected

    def objects(self) -> None:
        """Flat images and layers nothing kept names."""
        flats_linked, _ = linked(self.repo)
        flats = set(self.wants.flats) | {i.config for i in self.kept} | flats_linked
        layers = set(self.wants.layers)
        for image in self.kept:
            layers.update(image.layers)
            if image.name in self.wants.thin_pending:
                layers.update(image.previous_layers)   # a pushed thin image names them
        for digest in scan_digests(self.repo, FLAT):
            if digest not in flats:
                self.candidates.append(self.candidate("flat", digest, "no image names it",
                                                      self.knobs.grace))
        for digest in scan_digests(self.repo, LAYERS):
            if digest not in layers:
                self.candidates.append(self.candidate("layer", digest,
                                                      "no kept image uses it", self.knobs.grace))


def compute(repo: Repository, name: str, wants: Wants, clocks: dict[str, float],
            knobs: Policy, survey: Survey | None = None) -> Collection:
    """What is due at ``knobs.now``, pending and waiting; ``clocks`` is updated in place.
    ``survey``: the repository's converted images, when already known (else read)."""
    now = knobs.now
    result = Collection(name)
    run = _Collect(repo, wants, clocks, now, knobs, result)
    survey = survey or Survey.read(repo)
    run.images(survey.images)
    run.platforms(survey.platforms)
    result.protected = run.publics()
    run.objects()
    live = {c.key for c in run.candidates}
    for key in [k for k in clocks if k not in live]:
        del clocks[key]                   # referenced again (or gone): its clock restarts
    due = sorted((c for c in run.candidates if c.due <= now), key=lambda c: (c.since, c.key))
    result.due, result.pending = due[:knobs.limit], due[knobs.limit:]
    result.waiting = sorted((c for c in run.candidates if c.due > now), key=lambda c: c.due)
    return result


def delete(repo: Repository, c: Candidate, protected: set[str]) -> None:
    """Delete one object inside the open transaction; never follows a symlink out, never
    removes a public path a wanted image owns."""
    if c.kind == "platform":
        link = f"{MULTIARCH}/{c.id}"
        target = repo.link_target(link)
        if target is not None and link not in protected:
            repo.unlink_public(link, expected=target)
        rel = repo.metadata_rel(f"{MULTIARCH}/{c.id}")
        repo.delete(rel)
        repo.prune_empty(posixpath.dirname(rel))
    elif c.kind in ("image", "public"):
        public = c.public if c.kind == "image" else c.id
        if public and public not in protected:
            check_rel(public)
            target = repo.link_target(public)
            if target is not None and _flat_of(posixpath.dirname(public), target):
                repo.unlink_public(public, expected=target)
        if c.kind == "image":
            rel = repo.metadata_rel(c.id)
            repo.delete(rel)
            repo.prune_empty(posixpath.dirname(rel))
    elif c.kind == "flat":
        repo.delete(f"{FLAT}/{hex_of(c.id)}")
    else:
        repo.delete(f"{LAYERS}/{hex_of(c.id)}")


def describe(c: Candidate, now: float) -> str:
    what = {"image": "image", "public": "public path", "platform": "platform",
            "flat": "flat image", "layer": "layer"}[c.kind]
    ident = hex_of(c.id) if c.kind in ("flat", "layer") else c.id
    age = max(now - c.since, 0.0) / DAY
    return f"{what} {ident}: {c.reason} for {age:.1f} days"
