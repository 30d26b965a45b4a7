"""DUCC's notification file: one JSON object a line, for tools that watch conversions.

Setting ``notification_file``. The action names and fields are DUCC's (ducc.md §9): pairs of
``start_…``/``end_…`` actions sharing an ``id``, with ``status`` (ok or error), ``error``,
``time_elapsed_s``, ``image``, ``layer_digest``, ``public_path``, ``size_bytes``, ``pid`` and
``time`` in DUCC's format. Several processes append to it (the run's workers, the listener): each
line is one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``, so lines never
interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from datetime import datetime
from pathlib import Path


def _stamp() -> str:
    """DUCC's time format (Go's ``_2 Jan 2006 - 15:04:05.000``)."""
    now = datetime.now()
    return f"{now.day:>2} {now:%b %Y - %H:%M:%S}.{now.microsecond // 1000:03d}"


def emit(path: Path | None, action: str, **fields) -> None:
    """Append one notification; a notification file that cannot be written is not a failure
    of the conversion it reports on."""
    if path is None:
        return
    record = {"time": _stamp(), "action": action, "pid": os.getpid(),
              **{k: v for k, v in fields.items() if v is not None}}
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)


@contextlib.contextmanager
def step(path: Path | None, kind: str, **fields):
    """``start_<kind>`` now, ``end_<kind>`` with the outcome when the block ends."""
    ident = str(uuid.uuid4())
    started = time.monotonic()
    emit(path, f"start_{kind}", id=ident, **fields)
    outcome = {"status": "ok"}
    try:
        yield outcome
    except BaseException as exc:
        outcome.update(status="error", error=str(exc)[:1000])
        raise
    finally:
        emit(path, f"end_{kind}", id=ident,
             time_elapsed_s=round(time.monotonic() - started, 3), **fields, **outcome)
