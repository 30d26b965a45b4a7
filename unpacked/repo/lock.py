"""Locks that make a run the only one: on ``cache/`` (doit's state) and on each repository.

A lock is a non-blocking ``flock`` on a file; the kernel drops it when the process dies, so a
crashed run never leaves one behind. The repository's lock lives with the repository (or its
CVMFS spool folder), so two runs with different ``cache`` settings still exclude each other.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import Busy, UnpackedError


class Lock:
    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock or raise Busy naming who holds it (waiting up to ``wait`` seconds)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise UnpackedError(f"cannot take the lock {self.path}: permission denied (run as "
                                "the user that owns it)") from None
        except OSError as exc:
            raise UnpackedError(f"cannot take the lock {self.path}: "
                                f"{exc.strerror or exc}") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.25)
                    continue
                os.close(fd)
                raise Busy(f"another run (pid {self.holder()}) is working on {self.what} "
                           f"({self.path}); exiting without changes") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self.fd = fd

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def forget(self) -> None:
        """In a forked child: drop the inherited descriptor (the parent keeps the lock)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None
