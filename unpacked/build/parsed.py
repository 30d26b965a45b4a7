"""Recipes as they were parsed last time, kept in ``cache/recipes/``.

Checking a recipe of ten thousand lines takes 0.12 s (its YAML nodes, every reference, every
template); loading the result it gave 0.05 s. Every ``doit``, ``doit list`` and ``doit info``
reads the recipes first, and a no-op run's HEADs cannot start before: the parse is kept, for
the file's path and exact text and for the code that checks it (a new version of the checks
parses again). A file with problems is never kept: its errors are found again each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from functools import cache
from pathlib import Path

from .. import recipe, reference
from ..recipe import Recipe
from ..repo.fs import write_local

FORMAT = b"1"


@cache
def _checks() -> bytes | None:
    """The digest of the code that checks recipes (None: not readable, nothing is kept)."""
    try:
        code = b"".join(Path(m.__file__).read_bytes() for m in (recipe, reference))
    except (OSError, TypeError):
        return None
    return hashlib.sha256(FORMAT + code).digest()


def parser(folder: Path, keep: bool = True):
    """``recipe.parse_recipe``, its results kept in ``folder`` (``keep`` False: only those
    kept already are used, nothing is written: a reader of cache/)."""
    def parse(path: Path, text: str) -> Recipe:
        checks = _checks()
        if checks is None:
            return recipe.parse_recipe(path, text)
        name = str(path).encode("utf-8", "surrogateescape")
        key = hashlib.sha256(checks + name + b"\0" +
                             text.encode("utf-8", "surrogateescape")).hexdigest()
        kept = folder / f"{hashlib.sha256(name).hexdigest()[:32]}.pickle"
        try:
            stored, parsed = pickle.loads(kept.read_bytes())
            if stored == key and isinstance(parsed, Recipe):
                return parsed
        except Exception:               # noqa: BLE001 - none kept, or unreadable: parse again
            pass
        parsed = recipe.parse_recipe(path, text)        # its RecipeError: never kept
        with contextlib.suppress(OSError):              # only a cache: never fatal
            if keep:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)   # ours alone: pickles
                write_local(kept, pickle.dumps((key, parsed),
                                               protocol=pickle.HIGHEST_PROTOCOL))
        return parsed
    return parse
