"""The repository layout (DESIGN.md's contract) and the atomic steps that fill it.

``.layers/<hex>/layerfs`` + ``layer.json``; ``.flat/<config-hex>/``;
``.metadata/<registry>/<repository>:<tag>/``; and the public relative symlinks. Every change
goes through ``repo.fs`` (no symlink followed, no predictable temp name) and through the
publisher's ``Writer`` (which refuses writes outside a transaction and, for the local
publisher, journals before it replaces).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

from ..errors import UnpackedError
from ..reference import is_digest
from .fs import Dir, UnsafePath, is_temp

CATALOG = ".cvmfscatalog"          # marks a nested CVMFS catalog
IS_ROOT = os.geteuid() == 0
LAYERS, FLAT, METADATA, MULTIARCH = ".layers", ".flat", ".metadata", ".multiarch"
STATE = ".unpacked"                # the local publisher's journal and revision
RESERVED = (LAYERS, FLAT, METADATA, MULTIARCH, STATE, CATALOG, ".cvmfsdirtab")


@functools.lru_cache(maxsize=1 << 16)
def hex_of(digest: str) -> str:
    """The folder name of a digest; anything but a checked digest is refused."""
    if not is_digest(digest):
        raise UnsafePath(f"refusing {digest!r} as a folder name: not a sha256/sha512 digest")
    return digest.partition(":")[2]


def public_target(rel: str, config_digest: str) -> str:
    """The symlink text from a public path to its flat image: ``../../.flat/<hex>``."""
    return "../" * rel.count("/") + f"{FLAT}/{hex_of(config_digest)}"


def check_rel(rel: str) -> list[str]:
    """The parts of a path inside the repository; refuse anything that could leave it."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafePath(f"refusing the path {rel!r}: not a clean relative path")
    return parts


class Writer:
    """How finished things are put in place: the publisher's policy. This one (the cvmfs
    publisher's) checks the transaction and replaces atomically; ``cvmfs_server abort``
    is its undo. The local publisher's journals first (``journal.JournaledWriter``)."""

    def __init__(self, check=None):
        self.check = check          # raises when no transaction is open

    def guard(self, path: str) -> None:
        if self.check:
            self.check(path)

    def replace(self, area: Dir, temp: str, final: str, rel: str) -> None:
        """Put the finished ``area/temp`` at ``area/final`` whole; the old one goes."""
        if area.lstat(final) is None:
            area.place(temp, area, final)
            return
        area.exchange(temp, area, final)           # ``final`` is never seen missing
        area.remove(temp)

    def delete(self, area: Dir, name: str, rel: str) -> None:
        area.remove(name)

    def symlink(self, area: Dir, name: str, target: str, rel: str) -> None:
        area.symlink(name, target)


class Repository:
    """One repository root (``<root>/<cvmfs_repo>``) and where everything lives inside it."""

    LAYERS, FLAT, METADATA, MULTIARCH = LAYERS, FLAT, METADATA, MULTIARCH

    def __init__(self, root: Path, catalogs: bool = False, writer: Writer | None = None):
        self.root = Path(root)
        self.catalogs = catalogs       # cvmfs: a nested catalog per layer and per flat image
        self.writer = writer or Writer()

    # -- opening ------------------------------------------------------------------------------

    def open(self, create: bool = False) -> Dir:
        return Dir.root(self.root, guard=self.writer.guard, create=create)

    @contextlib.contextmanager
    def open_area(self, rel: str, create: bool = True):
        """The folder ``rel`` of the repository, opened without following any symlink."""
        with self.open(create=create) as root, root.sub(rel, create=create) as area:
            yield area

    @contextlib.contextmanager
    def building(self, area_rel: str, final: str, label: str = ""):
        """The one way a finished thing reaches its final path: build it in a fresh folder
        beside ``area_rel/final`` (yielded, open), put it in place whole when the block ends,
        remove it when the block fails."""
        with self.open_area(area_rel) as area:
            temp = area.make_temp_dir(label or final[:12])
            try:
                with area.child(temp) as work:
                    work.guard = None       # inside a folder this run made under the guard
                    yield work
                    work.chmod_self(0o755)
                self.place(area, temp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    area.remove(temp)
                raise

    def rel_of(self, folder: Dir, name: str = "") -> str:
        base = folder.path[len(str(self.root)):].lstrip("/")
        return f"{base}/{name}".strip("/") if name else base

    def place(self, area: Dir, temp: str, final: str) -> None:
        self.writer.replace(area, temp, final, self.rel_of(area, final))

    # -- names --------------------------------------------------------------------------------

    @staticmethod
    def layer_name(digest: str) -> str:
        return hex_of(digest)

    def layer_dir(self, digest: str) -> Path:
        return self.root / LAYERS / hex_of(digest)

    def layerfs(self, digest: str) -> Path:
        return self.layer_dir(digest) / "layerfs"

    def flat_dir(self, config_digest: str) -> Path:
        return self.root / FLAT / hex_of(config_digest)

    def metadata_rel(self, name: str) -> str:
        check_rel(name)
        return f"{METADATA}/{name}"

    # -- reading (never through a symlink) ----------------------------------------------------

    def _stat(self, rel: str):
        parts = check_rel(rel)
        try:
            with self.open() as root, root.sub("/".join(parts[:-1])) as folder:
                return folder.lstat(parts[-1])
        except (UnpackedError, OSError):
            return None

    def read_json(self, rel_dir: str, name: str) -> dict | None:
        try:
            with self.open() as root, root.sub(rel_dir) as folder:
                data = folder.read_bytes(name)
        except (UnpackedError, OSError):
            return None
        try:
            doc = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def has_layer(self, digest: str) -> bool:
        rel = f"{LAYERS}/{hex_of(digest)}"
        fs = self._stat(f"{rel}/layerfs")
        return fs is not None and (fs.st_mode & 0o170000) == 0o040000 \
            and self.read_json(rel, "layer.json") is not None

    def has_flat(self, config_digest: str) -> bool:
        st = self._stat(f"{FLAT}/{hex_of(config_digest)}")
        return st is not None and (st.st_mode & 0o170000) == 0o040000

    def link_target(self, rel: str) -> str | None:
        parts = check_rel(rel)
        try:
            with self.open() as root, root.sub("/".join(parts[:-1])) as folder:
                return folder.readlink(parts[-1])
        except (UnpackedError, OSError):
            return None

    # -- changing -----------------------------------------------------------------------------

    def write_metadata(self, name: str, manifest: bytes, config: bytes, summary: dict) -> None:
        """``.metadata/<name>/``: the exact manifest and config bytes and a summary, whole."""
        rel = self.metadata_rel(name)
        parent_rel, _, leaf = rel.rpartition("/")
        old = self.read_json(rel, "image.json")
        summary = dict(_carry_forward(old, summary) if old else summary, written_at=time.time())
        with self.building(parent_rel, leaf) as folder:
            folder.write_file("manifest.json", manifest)
            folder.write_file("config.json", config)
            folder.write_file("image.json", json.dumps(summary, indent=1, sort_keys=True).encode())

    def link(self, rel: str, target: str) -> bool:
        """Point the public path ``rel`` at ``target``; True if it changed."""
        parts = check_rel(rel)
        with self.open_area("/".join(parts[:-1])) as area:
            st = area.lstat(parts[-1])
            if st is not None and (st.st_mode & 0o170000) != 0o120000:
                raise UnpackedError(f"public path {rel}: something that is not a symlink is "
                                    "there; not replaced")
            if area.readlink(parts[-1]) == target:
                return False
            self.writer.symlink(area, parts[-1], target, rel)
        return True

    def unlink_public(self, rel: str, expected: str | None = None) -> bool:
        """Remove the public symlink ``rel`` (only if it still says ``expected``, when given)
        and the folders it leaves empty."""
        parts = check_rel(rel)
        try:
            area = self.open().sub("/".join(parts[:-1]))
        except (UnpackedError, OSError):
            return False
        with area:
            current = area.readlink(parts[-1])
            if current is None or (expected is not None and current != expected):
                return False
            self.writer.delete(area, parts[-1], rel)
        self.prune_empty("/".join(parts[:-1]))
        return True

    def delete(self, rel: str) -> bool:
        """Remove a tree of the repository (GC), never following a symlink out of it."""
        parts = check_rel(rel)
        try:
            area = self.open().sub("/".join(parts[:-1]))
        except (UnpackedError, OSError):
            return False
        with area:
            if area.lstat(parts[-1]) is None:
                return False
            self.writer.delete(area, parts[-1], rel)
        return True

    def prune_empty(self, rel: str) -> None:
        """Remove folders left empty, from ``rel`` up to (not including) the root."""
        parts = [p for p in rel.split("/") if p]
        while parts:
            try:
                with self.open() as root, root.sub("/".join(parts[:-1])) as parent:
                    parent.rmdir(parts[-1])
            except (UnpackedError, OSError):
                return                      # not empty, or gone: stop here
            parts.pop()

    def clean_temps(self) -> list[str]:
        """Remove half-built folders a killed run left (they never sit at a final path)."""
        removed = []
        try:
            root = self.open()
        except UnpackedError:
            return removed
        with root:
            stack = [METADATA, LAYERS, FLAT]
            while stack:
                rel = stack.pop()
                try:
                    folder = root.sub(rel)
                except (UnpackedError, OSError):
                    continue
                with folder:
                    for name in folder.names():
                        if is_temp(name):
                            folder.remove(name)
                            removed.append(f"{rel}/{name}")
                        elif rel.startswith(METADATA) and folder.is_dir(name):
                            stack.append(f"{rel}/{name}")
        return removed


def _carry_forward(old: dict, new: dict) -> dict:
    """What GC needs from an image's earlier record: the layers its pushed thin image may
    still name, and public paths it was published at before."""
    out = dict(new)
    if old.get("config_digest") != new.get("config_digest"):
        out["previous_layers"] = old.get("layers", [])
    else:
        out["previous_layers"] = old.get("previous_layers", [])
    paths = [p for p in old.get("previous_public_paths", []) if isinstance(p, str)]
    if isinstance(old.get("public_path"), str):
        paths.append(old["public_path"])
    out["previous_public_paths"] = sorted({p for p in paths if p != new.get("public_path")})
    return out
