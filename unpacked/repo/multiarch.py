"""DUCC's ``.multiarch`` aliases: the ``uname -m`` names CVMFS clients put in ``$(CVMFS_ARCH)``.

A multi-platform image's public path is a variant symlink through
``.multiarch/$(CVMFS_ARCH:-x86_64)/…``; a client expands ``$(CVMFS_ARCH)`` to ``uname -m``
(``x86_64``, ``aarch64``, …) while the folders are named as OCI platforms (``amd64``,
``arm64:v8``). Alias symlinks in ``.multiarch/`` join the two (ducc.md's table, and the
32-bit ARM names ``uname -m`` prints, which DUCC lacks). An alias is made only when what it
names exists, and never over a real folder.
"""

from __future__ import annotations

import contextlib

from .layout import MULTIARCH, Repository

# alias -> the folders it may name, in order of preference
ALIASES = {
    "x86_64": ("amd64",), "x86-64": ("amd64",),
    "aarch64": ("arm64", "arm64:v8"), "arm64": ("arm64:v8",),
    "armhf": ("arm", "arm:v7"), "armv7l": ("arm:v7", "arm"),
    "armel": ("arm:v6",), "armv6l": ("arm:v6",),
    "i386": ("386",), "i686": ("386",),
}


def ensure_aliases(repo: Repository) -> list[str]:
    """Make the aliases whose targets exist; returns those made or changed."""
    made = []
    with contextlib.suppress(FileNotFoundError), repo.open_area(MULTIARCH, create=False) as area:
        folders = {e.name for e in area.scandir() if e.is_dir(follow_symlinks=False)}
        for alias, targets in ALIASES.items():
            if alias in folders:
                continue                     # a real folder of that name wins
            target = next((t for t in targets if t in folders), None)
            if target is None or area.readlink(alias) == target:
                continue
            if area.lstat(alias) is not None and area.readlink(alias) is None:
                continue                     # something else is there: left alone
            repo.writer.symlink(area, alias, target, f"{MULTIARCH}/{alias}")
            made.append(alias)
    return made
