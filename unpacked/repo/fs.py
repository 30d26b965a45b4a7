"""Small filesystem helpers shared by ingest, flattening and publishing: atomic, never following."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path


def temp_sibling(final: Path, label: str = "tmp") -> Path:
    """A fresh folder next to ``final`` (same filesystem, so a rename moves it into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{label}-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o755)
    return path


def is_temp(name: str) -> bool:
    return name.startswith(".tmp-") or name.startswith(".old-")


def remove_tree(path: Path) -> None:
    """Remove a tree that may hold read-only folders, never following a symlink out of it."""
    def onerror(func, failed, exc_info):
        parent = os.path.dirname(failed)
        try:
            st = os.lstat(parent)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(parent, stat.S_IMODE(st.st_mode) | 0o700)
            st = os.lstat(failed)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(failed, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass
        func(failed)

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    shutil.rmtree(path, onerror=onerror)


def make_dirs(root: Path, parts: list[str]) -> Path:
    """Make ``root/part/part...`` folder by folder, never through a symlink; a part that is
    not a real folder is left as it is and raised as NotADirectoryError. Safe against a
    racing mkdir."""
    current = root
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
                continue
            except FileExistsError:      # another worker made it meanwhile
                st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(str(current))
    return current


def replace_dir(temp: Path, final: Path) -> None:
    """Put ``temp`` at ``final`` whole, removing an older ``final`` (for re-ingests)."""
    if not os.path.lexists(final):
        os.rename(temp, final)
        return
    old = final.parent / f".old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(final, old)
    os.rename(temp, final)
    remove_tree(old)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file by rename, so readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def symlink_atomic(target: str, path: Path) -> None:
    """Point ``path`` at ``target`` with one rename: users never see it missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, path)
