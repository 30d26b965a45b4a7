"""Recipes as they were parsed last time, kept in ``cache/recipes/``.

Checking a recipe of ten thousand lines takes 0.12 s (its YAML nodes, every reference, every
template); loading the result it gave 0.05 s. Every ``doit``, ``doit list`` and ``doit info``
reads the recipes first, and a no-op run's HEADs cannot start before: a run keeps the parse,
for the file's path and exact text and for the code that checks it (a new version of the
checks, of PyYAML or of Python parses again). A file with problems is never kept: its errors
are found again each time. A pickle runs what it says when loaded: one is loaded only from a
folder and a regular file of the user running, where no one else may write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
import sys
from functools import cache
from pathlib import Path

import yaml

from .. import recipe, reference
from ..errors import UnpackedError
from ..recipe import Recipe
from ..repo.fs import owner_only, write_local

FORMAT = b"1"
MAX_KEPT = 256 << 20        # bytes of one kept parse (ten thousand lines: 2 MB)


@cache
def _checks() -> bytes | None:
    """The digest of what decides a parse: the code that checks recipes, the YAML library
    and the Python reading them (None: not readable, nothing is kept)."""
    try:
        code = b"".join(Path(m.__file__).read_bytes() for m in (recipe, reference))
    except (OSError, TypeError):
        return None
    parts = [FORMAT, code, yaml.__version__.encode(), recipe._Loader.__name__.encode(),
             repr(sys.version_info[:2]).encode()]
    return hashlib.sha256(b"\0".join(parts)).digest()


def _ours(folder: Path) -> bool:
    """The folder is this user's and no one else may write in it: only then is a pickle
    there loaded (loading one runs what it says)."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _load(kept: Path) -> tuple | None:
    """The kept (key, parse): a regular file of ours, not followed through a link, bounded."""
    try:
        fd = os.open(kept, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > MAX_KEPT:
            return None
        try:
            got = pickle.loads(f.read(MAX_KEPT + 1))
        except Exception:           # noqa: BLE001 - unreadable: parsed again
            return None
    return got if isinstance(got, tuple) and len(got) == 2 else None


def parser(folder: Path, keep: bool = True):
    """``recipe.parse_recipe``, its results kept in ``folder`` (``keep`` False: only those
    kept already are used, nothing is written: an inspection)."""
    def parse(path: Path, text: str) -> Recipe:
        checks = _checks()
        if checks is None:
            return recipe.parse_recipe(path, text)
        name = str(path).encode("utf-8", "surrogateescape")
        key = hashlib.sha256(checks + name + b"\0" +
                             text.encode("utf-8", "surrogateescape")).hexdigest()
        kept = folder / f"{hashlib.sha256(name).hexdigest()[:32]}.pickle"
        got = _load(kept) if _ours(folder) else None
        if got is not None and got[0] == key and isinstance(got[1], Recipe):
            return got[1]
        parsed = recipe.parse_recipe(path, text)        # its RecipeError: never kept
        if keep:
            with contextlib.suppress(OSError, UnpackedError):   # only a cache: never fatal
                owner_only(folder)
                if _ours(folder):
                    write_local(kept, pickle.dumps((key, parsed),
                                                   protocol=pickle.HIGHEST_PROTOCOL))
        return parsed
    return parse
