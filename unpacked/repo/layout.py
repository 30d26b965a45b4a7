"""The repository layout (DESIGN.md's contract) and the atomic steps that fill it.

``.layers/<hex>/layerfs`` + ``layer.json``; ``.flat/<config-hex>/``;
``.metadata/<registry>/<repository>:<tag>/``; and the public relative symlink.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UnpackedError
from .fs import is_temp, make_dirs, remove_tree, replace_dir, symlink_atomic, temp_sibling


def hex_of(digest: str) -> str:
    return digest.partition(":")[2]


def public_target(rel: str, config_digest: str) -> str:
    """The symlink text from a public path to its flat image: ``../../.flat/<hex>``."""
    return "../" * rel.count("/") + f".flat/{hex_of(config_digest)}"


class Repository:
    """One repository root (``<root>/<cvmfs_repo>``) and where everything lives inside it."""

    def __init__(self, root: Path, catalogs: bool = False,
                 guard: Callable[[Path], None] | None = None):
        self.root = root
        self.catalogs = catalogs       # cvmfs: a nested catalog per layer and per flat image
        self.guard = guard             # the publisher's check (and journal) before each write

    def place_dir(self, temp: Path, final: Path) -> None:
        """Put a finished folder at its final path, whole."""
        if self.guard:
            self.guard(final)
        replace_dir(temp, final)

    def layer_dir(self, digest: str) -> Path:
        return self.root / ".layers" / hex_of(digest)

    def layerfs(self, digest: str) -> Path:
        return self.layer_dir(digest) / "layerfs"

    def flat_dir(self, config_digest: str) -> Path:
        return self.root / ".flat" / hex_of(config_digest)

    def metadata_dir(self, name: str) -> Path:
        return self.root / ".metadata" / name

    def public(self, rel: str) -> Path:
        return self.root / rel

    def has_layer(self, digest: str) -> bool:
        d = self.layer_dir(digest)
        return (d / "layer.json").is_file() and (d / "layerfs").is_dir()

    def has_flat(self, config_digest: str) -> bool:
        return self.flat_dir(config_digest).is_dir()

    def link_target(self, rel: str) -> str | None:
        try:
            return os.readlink(self.public(rel))
        except OSError:
            return None


    def clean_temps(self) -> list[Path]:
        """Remove half-built folders left by a killed run (they never sit at a final path)."""
        removed = []
        for sub in (".layers", ".flat"):
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if is_temp(entry.name):
                    remove_tree(Path(entry.path))
                    removed.append(Path(entry.path))
        meta = self.root / ".metadata"
        if meta.is_dir():
            for dirpath, dirnames, filenames in os.walk(meta):
                for name in dirnames + filenames:
                    if is_temp(name):
                        remove_tree(Path(dirpath) / name)
                        removed.append(Path(dirpath) / name)
                dirnames[:] = [d for d in dirnames if not is_temp(d)]
        return removed

    def safe_parent(self, rel: str) -> Path:
        """Make the folders above a public path; refuse a part that is not a real folder."""
        try:
            return make_dirs(self.root, rel.split("/")[:-1])
        except NotADirectoryError as exc:
            raise UnpackedError(f"public path {rel}: {exc} is not a folder") from None

    def write_metadata(self, name: str, manifest: bytes, config: bytes, summary: dict) -> Path:
        """``.metadata/<name>/``: the exact manifest and config bytes and a summary, whole."""
        final = self.metadata_dir(name)
        self.safe_parent(str(final.relative_to(self.root)))
        old = read_json(final / "image.json")
        if old and old.get("config_digest") != summary.get("config_digest"):
            summary = dict(summary, previous_layers=old.get("layers", []))   # for thin images
        temp = temp_sibling(final)
        try:
            (temp / "manifest.json").write_bytes(manifest)
            (temp / "config.json").write_bytes(config)
            summary = dict(summary, written_at=time.time())
            (temp / "image.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
            self.place_dir(temp, final)
        except BaseException:
            remove_tree(temp)
            raise
        return final

    def link(self, rel: str, config_digest: str) -> bool:
        """Point the public path at the flat image; True if it changed."""
        target = public_target(rel, config_digest)
        if self.link_target(rel) == target:
            return False
        path = self.public(rel)
        if os.path.lexists(path) and not os.path.islink(path):
            raise UnpackedError(f"public path {rel}: something that is not a symlink is there")
        self.safe_parent(rel)
        if self.guard:
            self.guard(path)
        symlink_atomic(target, path)
        return True


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
