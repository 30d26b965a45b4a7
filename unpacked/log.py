"""Logging set-up shared by the CLI and doit: chatty for a person, quiet in cron.

When no person watches (cron, systemd, CI), every line starts with an ISO-8601 timestamp, so
a log file of many runs can be read and grepped.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime


def interactive() -> bool:
    """A person is watching: stderr is a terminal (cron and CI are not)."""
    return sys.stderr.isatty() and os.environ.get("CI") is None


def count(n: int, word: str) -> str:
    """``1 entry``, ``2 entries``, ``1 image``, ``0 images``."""
    if n == 1:
        return f"{n} {word}"
    plural = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" \
        else word + "s"
    return f"{n} {plural}"


def stamp() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


class _Stamped(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(f"{stamp()} {line}" for line in text.splitlines() or [""])


def setup(verbosity: int = -1) -> None:
    """``verbosity``: 0 warnings only, 1 progress, 2 debug; -1 picks 1 on a terminal."""
    if verbosity < 0:
        verbosity = 1 if interactive() else 0
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("unpacked")
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(message)s" if verbosity < 2 else "%(name)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if interactive() else _Stamped(fmt))
    root.addHandler(handler)
    root.propagate = False
