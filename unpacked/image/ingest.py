"""Layer ingest: blob stream -> decompress -> verified tar -> safe extraction into ``layerfs``.

Every tar entry is treated as hostile. One ``Extractor`` owns all writes of a layer, through
``repo.fs``: names are cleaned (leading ``/`` stripped, ``..`` refused, length and depth
bounded), each parent is opened as a real folder (never through a symlink), files are created
``O_EXCL|O_NOFOLLOW`` and their attributes set on the open descriptor. Whiteouts stay as plain
empty files; flattening interprets them. Memory does not grow with the layer's shape, and the
bytes the files hold count against the size limit before they are written (a sparse file by
its apparent size, so it cannot inflate past it; its holes stay holes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import zstandard
from isal import igzip

from ..errors import ImageError, sanitize
from ..repo.fs import Dir, FolderCache, UnsafePath, raise_fd_limit
from ..repo.layout import CATALOG, IS_ROOT, Repository
from . import tarstream
from .tarstream import DIRECTORY, HARDLINK, REGULAR, SYMLINK, Member, TarReader

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
COPY_CHUNK = 1 << 20
SMALL_FILE = 64 << 10              # files this small are read whole, in one piece
OPEN_DIRS = 64                     # folders kept open while extracting
REPORTED = 1000                    # names kept per list in layer.json
MAX_EXTERNAL_LINKS = 10_000        # hardlinks to lower layers one layer may hold
MAX_LINK_BYTES = 4 << 20           # ... and the bytes of their names, together
DIR_TIMES = "dir-times"            # spilled beside layerfs while extracting


class LayerError(ImageError):
    """A layer cannot be ingested; the message names the layer and, when known, the entry."""


def compression_of(media_type: str) -> str:
    """What a layer's media type promises: gzip, zstd or tar."""
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return "tar"


def sniff(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


class _Ahead:
    """The uncompressed stream, made by a thread of its own while the caller unpacks: the
    network read, both digests and the decompression overlap the tar parsing and the writes,
    as the stages of a shell pipeline do (igzip, zstd, hashlib and sockets release the GIL).

    The thread hashes and counts what passes (the diff_id), stops a decompression bomb, and
    reads the blob to its end (its digest is checked there). It never touches the disk, so a
    caller that gives up just stops reading; the thread ends at its next chunk. Its errors
    are raised to the reader, unchanged.
    """

    DEPTH = 4                       # chunks made ahead: memory is DEPTH * COPY_CHUNK

    def __init__(self, plain: BinaryIO, blob: BinaryIO, limit: int, what: str):
        self.sha = hashlib.sha256()
        self.count = 0
        self._chunks: queue.Queue = queue.Queue(self.DEPTH)
        self._stop, self._ended = threading.Event(), False
        self._thread = threading.Thread(target=self._make, args=(plain, blob, limit, what),
                                        name="ingest-read", daemon=True)
        self._thread.start()

    def _make(self, plain: BinaryIO, blob: BinaryIO, limit: int, what: str) -> None:
        try:
            while data := plain.read(COPY_CHUNK):
                self.count += len(data)
                if self.count > limit:
                    raise LayerError(f"{what}: uncompressed size passes the limit of "
                                     f"{limit:,} bytes (decompression bomb?); refused")
                self.sha.update(data)
                if not self._put(data):
                    return
            drain(blob)            # trailing bytes of the blob: its digest is checked at EOF
            self._put(b"")
        except BaseException as exc:        # noqa: BLE001 - handed to the reader as it is
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pull(self) -> bytes:
        """The next piece of the uncompressed stream; ``b""`` at its end."""
        if self._ended:
            return b""
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
        return item

    def close(self) -> None:
        self._stop.set()


def drain(stream: BinaryIO) -> None:
    while stream.read(COPY_CHUNK):
        pass


@dataclass
class Report:
    """What extraction changed or refused, kept in layer.json and shown to the operator.

    Lists keep the first ``REPORTED`` names; the counts are complete.
    """

    entries: int = 0
    written: int = 0
    skipped: list[str] = field(default_factory=list)          # special files not created
    skipped_count: int = 0
    dropped_setid: list[str] = field(default_factory=list)    # set-uid/gid bits removed
    dropped_setid_count: int = 0
    duplicates: list[str] = field(default_factory=list)
    duplicates_count: int = 0
    replaced_catalog: bool = False
    external_links: dict[str, str] = field(default_factory=dict)  # hardlinks to lower layers

    def note(self, kind: str, name: str) -> None:
        setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + 1)
        names = getattr(self, kind)
        if len(names) < REPORTED:
            names.append(name)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: a write may take only part of it (a signal, a full disk
    on the next call), and an unbuffered file object's ``write`` says so without retrying."""
    done = os.write(fd, data)
    if done < len(data):
        view = memoryview(data)
        while done < len(data):
            done += os.write(fd, view[done:])


def _write_sparse(fd: int, tar: TarReader, member: Member) -> None:
    """A sparse file's regions where the map puts them; the holes stay holes."""
    chunks = tar.chunks(COPY_CHUNK)
    piece = memoryview(b"")
    for offset, length in member.sparse or ():
        while length:
            if not piece:
                more = next(chunks, None)
                if more is None:                  # the reader checks; never trust it twice
                    raise tarstream.TarError("a sparse map past the data stored")
                piece = memoryview(more)
            n = min(length, len(piece))
            done = os.pwrite(fd, piece[:n], offset)
            piece, offset, length = piece[done:], offset + done, length - done
    os.ftruncate(fd, member.size)


def clean_name(raw: str) -> str | None:
    """The relative path of an entry, or None when it climbs out with ``..``.

    A leading ``/`` and ``./`` are stripped as GNU tar does (``umoci insert`` writes ``/etc``).
    """
    framed = f"/{raw}/"
    if "//" not in framed and "/./" not in framed and "/../" not in framed:
        return raw                          # already clean: most names
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


_SPECIAL = {tarstream.CHAR: "device", tarstream.BLOCKDEV: "device", tarstream.FIFO: "fifo"}


@dataclass(slots=True)
class _At:
    """One entry being extracted: the tar member, its name as written and cleaned, and the
    open folder it goes in."""

    member: Member
    entry: str
    rel: str
    parent: Dir
    name: str


class Extractor:
    """Owns every write of one layer into ``root``; refuses anything that would leave it."""

    def __init__(self, root: Dir, what: str, limit: int, times: Dir):
        self.root, self.what, self.limit = root, what, limit
        self.report = Report()
        self.umask = root.creation_umask()
        self.owner = root.creation_owner() if IS_ROOT else None     # a file made has it
        self.link_bytes = 0
        now = int(time.time())
        self.folders = FolderCache(root, OPEN_DIRS, on_create=lambda rel: self._time(rel, now))
        self._times = os.fdopen(times.create(DIR_TIMES, 0o600), "w", encoding="utf-8",
                                errors="surrogateescape")

    def close(self) -> None:
        self.folders.close()
        with contextlib.suppress(OSError):     # a full disk: its last flush fails; unused
            self._times.close()

    def fail(self, entry: str, why: str) -> LayerError:
        return LayerError(f"{self.what}: entry {entry!r}: {why}; layer refused")

    # -- folders ------------------------------------------------------------------------------

    def _folder(self, rel: str, entry: str, create: bool = True) -> Dir | None:
        """The open folder ``rel`` (made if missing when ``create``), never through a symlink."""
        try:
            return self.folders.get(rel, create)
        except UnsafePath:
            raise self.fail(entry, self._not_folder(rel)) from None

    def _not_folder(self, rel: str) -> str:
        """Which parent of an entry is not a real folder, and what it is (for the message)."""
        parts = rel.split("/")
        for depth in range(len(parts)):
            parent = self.folders.get("/".join(parts[:depth]))
            st = parent.lstat(parts[depth])
            if st is not None and not stat.S_ISDIR(st.st_mode):
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
                return f"its parent {'/'.join(parts[:depth + 1])!r} is a {kind}, not a folder"
        return f"its parent {rel!r} is not a folder"

    def _time(self, rel: str, mtime: int) -> None:
        self._times.write(f"{mtime} {rel}\0")       # NUL: the one byte no name can hold

    # -- entries ------------------------------------------------------------------------------

    def _clear(self, at: _At, new_is_dir: bool) -> bool:
        """Remove what stands at the entry's path unless both are folders (then True: merge)."""
        st = at.parent.lstat(at.name)
        if st is None:
            return False
        self.report.note("duplicates", at.entry)
        if stat.S_ISDIR(st.st_mode) and new_is_dir:
            return True
        self.folders.forget(at.rel)
        at.parent.remove(at.name)
        return False

    def _mode(self, member: Member, rel: str, is_dir: bool) -> int:
        mode = stat.S_IMODE(member.mode)
        if mode & 0o6000:
            self.report.note("dropped_setid", rel)
            mode &= ~0o6000
        return mode | (0o700 if is_dir else 0o600)

    def _mtime(self, member: Member) -> int:
        mtime = member.mtime
        return mtime if 0 < mtime < 1 << 33 else int(time.time())

    def _owner_of(self, at: _At) -> tuple[int, int]:
        uid, gid = at.member.uid, at.member.gid
        if not (isinstance(uid, int) and isinstance(gid, int) and 0 <= uid < 1 << 32
                and 0 <= gid < 1 << 32):
            raise self.fail(at.entry, f"its owner {uid}:{gid} is out of range")
        return uid, gid

    def extract(self, tar: TarReader, member: Member) -> None:
        entry = member.name
        rel = clean_name(entry)
        if rel is None:
            raise self.fail(entry, "its name climbs out of the layer with '..'")
        if len(rel) >= tarstream.MAX_DEPTH and (len(os.fsencode(rel)) > tarstream.MAX_NAME
                                                or rel.count("/") >= tarstream.MAX_DEPTH):
            raise self.fail(entry[:200], "its name is longer or deeper than any real path")
        if "\0" in rel:
            raise self.fail(entry, "a NUL byte in its name")
        parent_rel, _, base = rel.rpartition("/")
        if base == WHITEOUT:
            raise self.fail(entry, "a whiteout with an empty name")
        self.report.entries += 1
        if rel == "":
            if member.kind != DIRECTORY:
                raise self.fail(entry, "refusing to change the type of the root folder")
            self.root.chmod_self(self._mode(member, rel, True))
            self._time("", self._mtime(member))
            return
        at = _At(member, entry, rel, self._folder(parent_rel, entry), base)
        if base == CATALOG:
            # a CVMFS catalog marker is the repository's business, never the image's
            self.report.replaced_catalog |= parent_rel == ""
            self.report.note("skipped", f"{rel} (CVMFS catalog marker)")
            self._clear(at, False)
            return
        self._dispatch(tar, at)

    def _dispatch(self, tar: TarReader, at: _At) -> None:
        member = at.member
        whiteout = at.name.startswith(WHITEOUT)
        kind = member.kind
        if kind == DIRECTORY and not whiteout:
            self._dir(at)
        elif kind == REGULAR or whiteout:
            self._file(tar, at, whiteout)
        elif kind == SYMLINK:
            self._symlink(at)
        elif kind == HARDLINK:
            self._hardlink(at)
        elif kind in _SPECIAL:
            self.report.note("skipped", f"{at.rel} ({_SPECIAL[kind]})")
        else:
            self.report.note("skipped", f"{at.rel} (tar type {kind!r})")

    def _owner(self, at: _At) -> None:
        uid, gid = self._owner_of(at)
        if IS_ROOT:
            at.parent.chown(at.name, uid, gid)

    def _dir(self, at: _At) -> None:
        mode = self._mode(at.member, at.rel, True)
        try:
            at.parent.mkdir(at.name, mode)
        except FileExistsError:     # looked at only then: most names are new
            if self._clear(at, True):
                at.parent.chmod(at.name, mode)      # merged into the folder there
            else:
                at.parent.mkdir(at.name, mode)
        self._owner(at)
        self._time(at.rel, self._mtime(at.member))

    def _file(self, tar: TarReader, at: _At, whiteout: bool) -> None:
        """A new file with the entry's mode from the start, written through its descriptor;
        what stood at its name is looked at only when there is something (most names are
        new: one call less each)."""
        member = at.member
        mode = self._mode(member, at.rel, False)
        content = member.kind == REGULAR and not whiteout
        if content:
            self.report.written += member.size
            if self.report.written > self.limit:
                raise self.fail(at.entry, f"the layer writes more than {self.limit:,} bytes "
                                "(a sparse or decompression bomb?)")
        uid, gid = self._owner_of(at)
        try:
            fd = at.parent.create(at.name, mode, self.umask)
        except FileExistsError:
            self._clear(at, False)
            fd = at.parent.create(at.name, mode, self.umask)
        try:
            if content and member.sparse is not None:
                _write_sparse(fd, tar, member)
            elif content and member.size <= SMALL_FILE:
                if member.size:
                    write_all(fd, tar.data())
            elif content:
                for chunk in tar.chunks(COPY_CHUNK):
                    write_all(fd, chunk)
            if IS_ROOT and (uid, gid) != self.owner:
                os.fchown(fd, uid, gid)
            ns = self._mtime(member) * 10**9
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _symlink(self, at: _At) -> None:
        target = at.member.linkname
        if len(target) > tarstream.MAX_NAME or "\0" in target:
            raise self.fail(at.entry, "a symlink target longer than any real path")
        self._clear(at, False)
        at.parent.new_symlink(at.name, target)
        self._owner(at)
        mtime = self._mtime(at.member) * 10**9
        at.parent.utime(at.name, (mtime, mtime))

    def _hardlink(self, at: _At) -> None:
        target = clean_name(at.member.linkname)
        if target is None or target == "":
            raise self.fail(at.entry, f"a hardlink to {at.member.linkname!r}, outside the layer")
        if len(os.fsencode(target)) > tarstream.MAX_NAME or \
                target.count("/") >= tarstream.MAX_DEPTH:
            raise self.fail(at.entry, "a hardlink to a name longer or deeper than any real path")
        target_parent, _, target_name = target.rpartition("/")
        try:
            source = self._folder(target_parent, at.entry, create=False)
        except LayerError:
            raise self.fail(at.entry, f"a hardlink through {target_parent!r}, not a folder") \
                from None
        st = source.lstat(target_name) if source is not None else None
        if st is None:
            # Its target lives in a lower layer: flattening links it there.
            self.link_bytes += len(at.rel) + len(target)
            if len(self.report.external_links) >= MAX_EXTERNAL_LINKS or \
                    self.link_bytes > MAX_LINK_BYTES:
                raise self.fail(at.entry, f"more than {MAX_EXTERNAL_LINKS:,} hardlinks (or "
                                f"{MAX_LINK_BYTES >> 20} MiB of their names) to lower layers")
            self.report.external_links[at.rel] = target
            return
        if stat.S_ISDIR(st.st_mode):
            raise self.fail(at.entry, f"a hardlink to the folder {target!r}")
        if target == at.rel:
            return
        self._clear(at, False)
        at.parent.hardlink(source, target_name, at.name)

    def finish(self) -> None:
        """Folder times last: creating children changed them."""
        self._times.flush()


def _apply_dir_times(layerfs: Dir, times: Dir) -> None:
    """Streamed back from the spill file, so memory does not grow with the folder count."""
    folders = FolderCache(layerfs, OPEN_DIRS)
    stream = times.open_file(DIR_TIMES)
    try:
        for raw in _records(stream):
            mtime, _, rel = raw.decode("utf-8", "surrogateescape").partition(" ")
            ns = int(mtime) * 10**9
            with contextlib.suppress(OSError):
                if rel == "":
                    layerfs.utime_self((ns, ns))
                    continue
                parent_rel, _, name = rel.rpartition("/")
                parent = folders.get(parent_rel)
                if parent is not None and parent.is_dir(name):
                    parent.utime(name, (ns, ns))
    finally:
        folders.close()
        if stream:
            stream.close()


def _records(stream) -> Iterator[bytes]:
    """NUL-terminated records of a file, read in chunks."""
    rest = b""
    while stream is not None and (chunk := stream.read(COPY_CHUNK)):
        *whole, rest = (rest + chunk).split(b"\0")
        yield from whole


def _decompressor(stream: io.BufferedReader, promised: str, what: str):
    head = stream.peek(4)[:4]
    actual = sniff(head)
    if actual != promised:
        log.warning("%s: media type says %s but the content is %s; reading it as %s",
                    what, promised, actual, actual)
    if actual == "gzip":
        return igzip.GzipFile(fileobj=stream, mode="rb"), actual
    if actual == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        return reader, actual
    return stream, actual


@dataclass
class Claims:
    """What the images naming a blob say about it; the blob's own bytes decide."""

    digest: str
    diff_ids: tuple[str, ...]
    media_type: str
    size: int


def _extract(blob: BinaryIO, layerfs: Dir, work: Dir, claims: Claims, max_bytes: int,
             what: str) -> tuple[Report, str, str, int]:
    buffered = io.BufferedReader(blob, COPY_CHUNK) if not hasattr(blob, "peek") else blob
    plain, found = _decompressor(buffered, compression_of(claims.media_type), what)
    ahead = _Ahead(plain, buffered, max_bytes, what)
    extractor = Extractor(layerfs, what, max_bytes, work)
    member = None
    try:
        tar = TarReader(ahead.pull)
        for member in tar:
            extractor.extract(tar, member)
        tar.rest()                 # padding after the end-of-archive blocks, the blob's end
        extractor.finish()
    except (tarstream.TarError, EOFError, zstandard.ZstdError) as exc:
        at = f" at entry {member.name!r}" if member is not None else ""
        raise LayerError(f"{what}: broken or truncated archive{at}: {exc}") from None
    except OSError as exc:
        if isinstance(exc, UnsafePath):
            raise
        at = f" entry {member.name!r}:" if member is not None else ""
        raise LayerError(f"{what}:{at} {exc.strerror or exc}") from None
    except (ValueError, OverflowError, RecursionError, UnicodeError) as exc:
        at = f" entry {member.name!r}:" if member is not None else ""
        raise LayerError(f"{what}:{at} cannot be read ({type(exc).__name__}: "
                         f"{sanitize(exc, 100)}); layer refused") from None
    finally:
        extractor.close()
        ahead.close()
    return extractor.report, "sha256:" + ahead.sha.hexdigest(), found, ahead.count


def ingest(blob: BinaryIO, repo: Repository, claims: Claims, *,
           max_bytes: int = 64 << 30) -> dict:
    """Unpack one layer blob into ``.layers/<hex>/layerfs`` with ``layer.json``, atomically.

    ``blob`` must verify its own digest at EOF (``BlobStream`` does); the uncompressed stream
    must hash to one of the ``diff_ids`` the images claim. Nothing reaches the final path
    unless both hold.
    """
    what = f"layer {claims.digest}"
    raise_fd_limit()
    with repo.building(repo.LAYERS, repo.layer_name(claims.digest), claims.digest[7:19]) as work:
        work.mkdir("layerfs", 0o755)
        with work.child("layerfs") as layerfs:
            report, diff_id, found, count = _extract(blob, layerfs, work, claims, max_bytes,
                                                     what)
            if diff_id not in claims.diff_ids:
                said = " or ".join(claims.diff_ids)
                raise LayerError(f"{what}: uncompressed content hashes to {diff_id}, but the "
                                 f"image config says diff_id {said}; refused")
            _apply_dir_times(layerfs, work)
            if repo.catalogs:
                os.close(layerfs.create(CATALOG, 0o644))   # a nested catalog each
        work.unlink(DIR_TIMES)
        info = _info(claims, diff_id, found, count, report)
        work.write_file("layer.json", json.dumps(info, indent=1, sort_keys=True).encode())
    _log_report(what, report)
    return info


def _info(claims: Claims, diff_id: str, found: str, count: int, report: Report) -> dict:
    info = {"digest": claims.digest, "diff_id": diff_id, "size": claims.size,
            "media_type": claims.media_type, "compression": found,
            "uncompressed_size": count, "ingested_at": time.time()}
    info.update(asdict(report))
    return info


def _log_report(what: str, report: Report) -> None:
    if report.skipped_count:
        log.warning("%s: %d special file(s) not created: %s", what, report.skipped_count,
                    sanitize(", ".join(report.skipped[:5]), 300))
    if report.dropped_setid_count:
        log.info("%s: set-uid/set-gid dropped on %d file(s)", what, report.dropped_setid_count)
    if report.replaced_catalog:
        log.warning("%s: the layer's own /%s was not kept", what, CATALOG)


def read_info(repo: Repository, digest: str) -> dict | None:
    """``layer.json`` of an ingested layer, or None when the layer is absent or incomplete."""
    return repo.read_json(f"{repo.LAYERS}/{repo.layer_name(digest)}", "layer.json")
