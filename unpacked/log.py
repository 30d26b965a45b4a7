"""Logging set-up shared by the CLI and doit: chatty for a person, quiet in cron."""

from __future__ import annotations

import logging
import os
import sys


def interactive() -> bool:
    """A person is watching: stderr is a terminal (cron and CI are not)."""
    return sys.stderr.isatty() and os.environ.get("CI") is None


def setup(verbosity: int | None = None) -> None:
    """``verbosity``: 0 warnings only, 1 progress, 2 debug; None picks 1 on a terminal."""
    if verbosity is None:
        env = os.environ.get("UNPACKED_VERBOSITY")
        verbosity = int(env) if env and env.isdigit() else (1 if interactive() else 0)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("unpacked")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(message)s" if verbosity < 2 else "%(asctime)s %(name)s %(levelname)s %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.propagate = False
