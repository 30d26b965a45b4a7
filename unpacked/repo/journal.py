"""The local publisher's write-ahead journal.

Every change to a final path is recorded, and the record fsynced, *before* it happens; the
undo of each record is idempotent, so an abort, or the recovery of a crashed run (itself
killed and replayed any number of times), puts back exactly what the transaction changed.
Backups are dropped only after the publish record is durable.

``.unpacked/journal`` holds one JSON object a line: a header ``{"txn": id}``, then
``replace`` (a finished folder swapped in), ``delete`` (moved to a backup) and ``symlink``
(a public link set) entries. Inodes tell which side of an interrupted swap holds what.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path

from ..errors import UnpackedError
from . import crash
from .fs import Dir, temp_name
from .layout import STATE, Writer

JOURNAL, PUBLISHED, BACKUPS = "journal", "published.json", "backup"


class JournalError(UnpackedError):
    """The journal cannot be written: nothing is changed without it."""


def _append(state: Dir, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=state.fd)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ino(folder: Dir, name: str) -> int | None:
    st = folder.lstat(name)
    return st.st_ino if st else None


class Journal:
    """The journal of one repository's open transaction."""

    def __init__(self, root: Path):
        self.root = root

    def _state(self, create: bool = True) -> Dir:
        """The state folder; reading (``create=False``) makes no folder, and raises when
        there is none."""
        root = Dir.root(self.root, create=create)
        with root:
            return root.sub(STATE, create=create, mode=0o700)

    def is_open(self) -> bool:
        return os.path.isfile(self.root / STATE / JOURNAL)

    def txn(self) -> str | None:
        try:            # the header alone: a large transaction's journal is tens of MiB
            with self._state(create=False) as state:
                head = state.read_bytes(JOURNAL, limit=4096, head=True)
            record = json.loads((head or b"").split(b"\n", 1)[0])
        except (UnpackedError, OSError, ValueError):
            return None
        return record.get("txn") if isinstance(record, dict) else None

    def records(self) -> list[dict]:
        try:
            with self._state(create=False) as state:
                data = state.read_bytes(JOURNAL, limit=1 << 30)
        except (UnpackedError, OSError):
            return []
        out = []
        for line in (data or b"").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue        # cut by a crash: its change had not started
            if isinstance(record, dict):
                out.append(record)
        return out

    def open(self) -> str:
        txn = secrets.token_hex(8)
        with self._state() as state:
            crash.point("journal: open")
            fd = state.create(JOURNAL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write((json.dumps({"txn": txn, "opened": time.time()}) + "\n").encode())
                os.fsync(f.fileno())
            state.fsync()
        return txn

    def writer(self, check) -> JournaledWriter:
        return JournaledWriter(self, check)

    def log(self, record: dict) -> None:
        with self._state() as state:
            if state.lstat(JOURNAL) is None:
                raise JournalError(f"{self.root}: no open transaction journal")
            _append(state, record)

    def backups(self) -> Dir:
        with self._state() as state:
            return state.sub(BACKUPS, create=True, mode=0o700)

    # -- ending -------------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self.published().get("revision", 0))

    def published(self) -> dict:
        try:
            with self._state(create=False) as state:
                data = state.read_bytes(PUBLISHED)
            doc = json.loads(data) if data else {}
        except (UnpackedError, OSError, ValueError):
            doc = {}
        return doc if isinstance(doc, dict) else {}

    def publish(self, message: str) -> list[str]:
        """Record the publish (durably), then drop backups and the journal; returns what
        could not be cleaned (it is retried at the next publish or recovery)."""
        txn = self.txn()
        record = {"revision": self.revision() + 1, "txn": txn, "time": time.time(),
                  "message": message}
        with self._state() as state:
            crash.point("publish: record")
            state.write_file(PUBLISHED, json.dumps(record).encode(), 0o644, sync=True)
            state.fsync()
        return self.finish()

    def finish(self) -> list[str]:
        """After a publish record: drop backups, then the journal. A backup that resists
        stays in ``.unpacked/backup`` (reported) and is tried again at the next publish."""
        leftovers = []
        with self.backups() as backups:
            for name in backups.names():
                crash.point("publish: drop backup")
                try:
                    backups.remove(name)
                except OSError as exc:
                    leftovers.append(f"could not delete {backups.path}/{name}: "
                                     f"{exc.strerror or exc}")
        with self._state() as state:
            crash.point("publish: drop journal")
            with contextlib.suppress(FileNotFoundError):
                state.unlink(JOURNAL)
            state.fsync()
        return leftovers

    def abort(self, cleanup=None) -> None:
        """Undo every record, newest first, then ``cleanup`` (half-built folders), then drop
        the journal; safe to interrupt and to run again."""
        records = self.records()
        with Dir.root(self.root) as root, self.backups() as backups:
            for record in reversed(records[1:]):
                crash.point(f"recover: undo {record.get('op')}")
                _undo(root, backups, record)
        if cleanup:
            cleanup()
        with self._state() as state:
            crash.point("recover: drop journal")
            with contextlib.suppress(FileNotFoundError):
                state.unlink(JOURNAL)
            state.fsync()

    def recover(self, cleanup=None) -> str | None:
        """At the start of a run: finish a publish that was recorded, else abort. Returns
        what was done, or None when no transaction was left open."""
        if not self.is_open():
            return None
        txn = self.txn()
        if txn and self.published().get("txn") == txn:
            self.finish()
            return "finished"
        self.abort(cleanup)
        return "aborted"


def _area(root: Dir, rel: str) -> tuple[Dir, str] | None:
    """The folder of ``rel`` (made again when garbage collection pruned it empty)."""
    parent, _, name = rel.rpartition("/")
    try:
        return root.sub(parent, create=True), name
    except (UnpackedError, OSError):
        return None


def _undo(root: Dir, backups: Dir, record: dict) -> None:
    found = _area(root, str(record.get("rel", "")))
    if found is None:
        return
    area, name = found
    with area:
        op = record.get("op")
        if op == "symlink":
            _undo_symlink(area, name, record.get("old"))
        elif op == "delete":
            backup = record.get("backup", "")
            if backups.lstat(backup) is not None:
                if area.lstat(name) is not None:
                    area.remove(name)
                backups.place(backup, area, name)
        elif op == "replace":
            _undo_replace(area, name, backups, record)


def _undo_symlink(area: Dir, name: str, old: str | None) -> None:
    if old is None:
        if area.readlink(name) is not None:
            area.unlink(name)
    elif area.readlink(name) != old:
        area.symlink(name, old)


def _undo_replace(area: Dir, name: str, backups: Dir, record: dict) -> None:
    new, temp, backup = record.get("new"), record.get("temp", ""), record.get("backup", "")
    if not record.get("existed"):
        if _ino(area, name) == new:
            area.remove(name)
        area.remove(temp)
        return
    if backups.lstat(backup) is not None:            # swapped, old one moved to backups
        if _ino(backups, backup) != new:
            backups.exchange(backup, area, name)     # the old one back in place
        backups.remove(backup)
    elif area.lstat(temp) is not None:               # swapped or not: the inode tells
        if _ino(area, temp) != new:
            area.exchange(temp, area, name)
        area.remove(temp)


class JournaledWriter(Writer):
    """Puts things in place as ``Writer`` does, each change journaled first."""

    def __init__(self, journal: Journal, check):
        super().__init__(check)
        self.journal = journal

    def replace(self, area: Dir, temp: str, final: str, rel: str) -> None:
        existed = area.lstat(final) is not None
        backup = temp_name(final)
        self.journal.log({"op": "replace", "rel": rel, "temp": temp, "backup": backup,
                          "new": _ino(area, temp), "existed": existed})
        crash.point("replace: journaled")
        if not existed:
            area.place(temp, area, final)
            crash.point("replace: placed")
            return
        area.exchange(temp, area, final)
        crash.point("replace: swapped")
        with self.journal.backups() as backups:
            area.rename(temp, backups, backup)
        crash.point("replace: old kept")

    def delete(self, area: Dir, name: str, rel: str) -> None:
        backup = temp_name(name)
        self.journal.log({"op": "delete", "rel": rel, "backup": backup})
        crash.point("delete: journaled")
        with self.journal.backups() as backups:
            area.rename(name, backups, backup)
        crash.point("delete: moved")

    def symlink(self, area: Dir, name: str, target: str, rel: str) -> None:
        self.journal.log({"op": "symlink", "rel": rel, "old": area.readlink(name)})
        crash.point("symlink: journaled")
        area.symlink(name, target)
        crash.point("symlink: set")
