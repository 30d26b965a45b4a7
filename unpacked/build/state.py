"""The resolved state kept in ``cache/``: what each input pointed at when last resolved.

Task generation reads only this (and the recipes), so ``doit list``/``info``/``forget`` work
offline. Values are plain JSON-able dicts so that a code upgrade never breaks the cache; a
value that does not load is treated as absent (the next run resolves again).

A user who may read ``cache/`` but not write it (``doit list`` as another operator) gets a
read-only view: diskcache cannot open a database it may not write, so ``ReadOnlyCache`` reads
its table directly (diskcache's layout, pinned by a test to the versions pyproject allows).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import diskcache

from ..errors import UnpackedError
from ..registry.resolved import Resolved
from ..repo.fs import owner_only

VERSION = 2          # of the values below; older values are ignored (resolved again)


class ReadOnlyCache:
    """``get`` on a diskcache folder without writing anything."""

    def __init__(self, folder: Path, snapshot: bool = True):
        path = folder / "cache.db"
        self._lock = threading.Lock()       # one connection, asked from any thread
        try:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.db.execute("SELECT 1 FROM Cache LIMIT 1")
        except sqlite3.OperationalError:
            if not snapshot:        # the reader must see later writes
                raise
            # a WAL database on read-only storage: read it as immutable (a listing's moment)
            self.db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True,
                                      check_same_thread=False)
        settings = dict(self.db.execute("SELECT key, value FROM Settings"))
        self.disk = diskcache.Disk(str(folder), min_file_size=settings["disk_min_file_size"],
                                   pickle_protocol=settings["disk_pickle_protocol"])

    def get(self, key, default=None):
        db_key, raw = self.disk.put(key)
        try:
            with self._lock:
                row = self.db.execute("SELECT mode, filename, value, expire_time FROM Cache "
                                      "WHERE key = ? AND raw = ?", (db_key, raw)).fetchone()
        except sqlite3.Error:
            return default
        if row is None or (row[3] is not None and row[3] < time.time()):
            return default
        try:
            return self.disk.fetch(row[0], row[1], row[2], False)
        except (OSError, ValueError, EOFError):
            return default

    def __contains__(self, key) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def items(self) -> dict:
        """Every string-keyed, unexpired entry, in one query (a run asks for each image's
        state several times: ten thousand single reads cost seconds)."""
        out = {}
        now = time.time()
        with self._lock:                # row by row: never every raw value at once
            for key, mode, filename, value, expire in self.db.execute(
                    "SELECT key, mode, filename, value, expire_time FROM Cache WHERE raw = 1"):
                if not isinstance(key, str) or (expire is not None and expire < now):
                    continue
                try:
                    out[key] = self.disk.fetch(mode, filename, value, False)
                except (OSError, ValueError, EOFError):
                    continue
        return out

    def close(self) -> None:
        self.db.close()


_MISSING = object()


def open_cache(folder: Path, writable: bool = True):
    """A diskcache in ``folder`` (owner-only), or a read-only view when it cannot be written."""
    if writable:
        try:
            owner_only(folder)
            return diskcache.Cache(str(folder))
        except (OSError, sqlite3.Error) as exc:
            if not (folder / "cache.db").exists():
                raise UnpackedError(f"cannot use the cache {folder}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None
    if not (folder / "cache.db").exists():
        return None
    try:
        return ReadOnlyCache(folder)
    except (sqlite3.Error, KeyError) as exc:
        raise UnpackedError(f"cannot read the cache {folder}: {exc}") from None


class State:
    """The cache, read whole at the first question and answered from memory after that
    (writes go to both): one query instead of several per image and run. A worker process
    (``whole=False``) asks about a few images only, so it reads key by key instead of holding
    every entry."""

    def __init__(self, cache_dir: Path, writable: bool = True, whole: bool = True):
        self.folder = cache_dir / "state"
        self.cache = open_cache(self.folder, writable)
        self.writable = isinstance(self.cache, diskcache.Cache)
        self.whole = whole
        self._memo: dict | None = None
        self._parsed: dict[str, Resolved] = {}
        self._lock = threading.Lock()
        self._reader: ReadOnlyCache | None = None
        self.writes = 0         # entries changed (what was worked out before may be stale)

    def close(self) -> None:
        if self._reader is not None and self._reader is not self.cache:
            self._reader.close()
        if self.cache is not None:
            self.cache.close()

    @property
    def read_whole(self) -> bool:
        """Answers come from memory now (a reader that reads key by key: always)."""
        return self._memo is not None or not self.whole

    def _entries(self) -> dict:
        with self._lock:
            if self._memo is None:
                self._memo = self._read_all()
            return self._memo

    def _read_all(self) -> dict:
        if self.cache is None:
            return {}
        if isinstance(self.cache, ReadOnlyCache):
            return self.cache.items()
        try:
            view = ReadOnlyCache(self.folder)
        except (sqlite3.Error, KeyError):
            return {}
        try:
            return view.items()
        except sqlite3.Error:
            return {}
        finally:
            view.close()

    @staticmethod
    def _key(kind: str, name: str, extra: str = "") -> str:
        return f"v{VERSION}\x1f{kind}\x1f{name}\x1f{extra}"

    def _get(self, key: str, from_disk: bool = False):
        """An entry from the memo read whole, or (a worker; ``from_disk``: one the memo
        dropped) from the cache itself."""
        if self.whole and not from_disk:
            return self._entries().get(key)
        reader = self.cache if self.whole else self._key_reader()
        if reader is None:
            return None
        try:
            return reader.get(key)
        except (OSError, sqlite3.Error, ValueError, EOFError):
            return None                 # unreadable: absent (resolved again next run)

    def _key_reader(self) -> ReadOnlyCache | None:
        """A worker's reads: a plain read-only connection, opened at its first question (after
        the resolve). diskcache's own maps 64 MiB of the file and caches up to 32 MiB of pages,
        tuned for a heavy reader; a worker asks for a few keys an action (at ten thousand
        images each worker held 22 MiB of the file)."""
        if self._reader is None and self.cache is not None:
            if isinstance(self.cache, ReadOnlyCache):
                self._reader = self.cache
            else:
                try:
                    self._reader = ReadOnlyCache(self.folder, snapshot=False)
                except (sqlite3.Error, KeyError):
                    return None
        return self._reader

    def _set(self, key: str, value) -> None:
        if not self.writable:
            raise UnpackedError("the cache is read-only for this user; run as its owner")
        if self._get(key) == value:
            return                                   # a no-op run writes nothing
        try:
            self.cache.set(key, value)
        except (OSError, sqlite3.Error) as exc:
            raise UnpackedError(f"cannot write the cache: {getattr(exc, 'strerror', exc)}") \
                from None
        self._changed(key, value)

    def _delete(self, key: str) -> None:
        if not self.writable or self._get(key) is None:
            return
        self.cache.delete(key)
        self._changed(key, _MISSING)

    def _changed(self, key: str, value) -> None:
        """Count a write (``_MISSING``: a delete) and mirror it in the memo read whole."""
        entries = self._entries() if self.whole else None
        with self._lock:
            self.writes += 1
            if entries is None:
                return
            if value is _MISSING:
                entries.pop(key, None)
            else:
                entries[key] = value

    def resolved(self, name: str, with_bytes: bool = False) -> Resolved | None:
        """What ``name`` resolved to (the object is shared: read it, never change it). The
        run's process keeps it ``light`` (without the manifest and config bytes);
        ``with_bytes`` reads those too, from the cache, and keeps nothing. A worker keeps
        nothing it reads, and reads the bytes always."""
        key = self._key("resolved", name)
        if self.whole:
            known = self._parsed.get(key)
            if known is not None and not with_bytes:
                return known
        got = self._get(key, from_disk=with_bytes)
        if got is None and self.whole and not with_bytes:
            # another thread parsed it meanwhile: ``_keep_parsed`` keeps the parsed form
            # before it drops the raw one
            return self._parsed.get(key)
        try:
            keep = self.whole and not with_bytes
            known = Resolved.from_dict(got, light=keep) if got else None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if known is not None and keep:
            known = self._keep_parsed(key, known, replace=False)
        return known

    def put_resolved(self, resolved: Resolved) -> None:
        key = self._key("resolved", resolved.name)
        if self._parsed.get(key) == resolved.light():
            return                                   # unchanged: nothing written
        self._set(key, resolved.to_dict())
        if self.whole:
            self._keep_parsed(key, resolved, replace=True)

    def _keep_parsed(self, key: str, resolved: Resolved, replace: bool) -> Resolved:
        """Keep the parsed, light form alone: the raw copy and the documents' bytes are dead
        weight here (the largest part of a run's memory, with many images). A reader
        (``replace`` False) keeps what it parsed only if no thread kept an entry meanwhile:
        it may have read the raw entry just before a resolve wrote a newer one."""
        light = resolved.light()
        entries = self._entries()
        with self._lock:
            if replace:
                self._parsed[key] = light
            else:
                light = self._parsed.setdefault(key, light)
            entries.pop(key, None)
        return light

    def tags(self, name: str) -> list[str] | None:
        got = self._get(self._key("tags", name))
        return [t for t in got if isinstance(t, str)] if isinstance(got, list) else None

    def put_tags(self, name: str, tags: list[str]) -> None:
        self._set(self._key("tags", name), list(tags))

    def blob_home(self, registry: str, digest: str) -> str | None:
        """A repository of ``registry`` we pushed ``digest`` to (for cross-repo mounts)."""
        got = self._get(self._key("blob", registry, digest))
        return got if isinstance(got, str) else None

    def put_blob_home(self, registry: str, digest: str, repository: str) -> None:
        self._set(self._key("blob", registry, digest), repository)

    def failure(self, name: str) -> str | None:
        got = self._get(self._key("failure", name))
        return got if isinstance(got, str) else None

    def put_failure(self, name: str, reason: str | None, gone: bool = False) -> None:
        """Record why ``name`` failed to resolve (None: it resolved); ``gone``: a 404."""
        key, gone_key = self._key("failure", name), self._key("gone", name)
        if reason is None:
            self._delete(key)
            self._delete(gone_key)
            return
        self._set(key, reason)
        if gone:
            self._set(gone_key, True)
        else:
            self._delete(gone_key)

    def gone(self, name: str) -> bool:
        """The registry answered 404 for ``name`` at its last resolve: gone upstream."""
        return bool(self._get(self._key("gone", name)))
