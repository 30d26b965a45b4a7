"""Layer ingest: blob stream -> decompress -> verified tar -> safe extraction into ``layerfs``.

Every tar entry is treated as hostile. One ``Extractor`` owns all writes of a layer: names are
cleaned (leading ``/`` stripped, ``..`` refused), each parent is checked to be a real folder
made by this layer (never a symlink), and files are created with ``O_NOFOLLOW|O_EXCL``.
Whiteouts stay as plain empty files; flattening interprets them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import igzip

from ..errors import UnpackedError
from ..repo.fs import remove_tree, replace_dir, temp_sibling

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CATALOG = ".cvmfscatalog"          # marks a nested CVMFS catalog
COPY_CHUNK = 1 << 20
IS_ROOT = os.geteuid() == 0


class LayerError(UnpackedError):
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


class _Counting(io.RawIOBase):
    """Hashes and counts what passes (the diff_id), and stops a decompression bomb."""

    def __init__(self, inner: BinaryIO, limit: int, what: str):
        self.inner, self.limit, self.what = inner, limit, what
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        if not data:
            return 0
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(f"{self.what}: uncompressed size passes the limit of "
                             f"{self.limit:,} bytes (decompression bomb?); refused")
        self.sha.update(data)
        buffer[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass


@dataclass
class Report:
    """What extraction changed or refused, kept in layer.json and shown to the operator."""

    entries: int = 0
    skipped: list[str] = field(default_factory=list)          # special files not created
    dropped_setid: list[str] = field(default_factory=list)    # set-uid/gid bits removed
    external_links: dict[str, str] = field(default_factory=dict)  # hardlinks to lower layers
    duplicates: list[str] = field(default_factory=list)


def clean_name(raw: str) -> str | None:
    """The relative path of an entry, or None when it climbs out with ``..``.

    A leading ``/`` and ``./`` are stripped as GNU tar does (``umoci insert`` writes ``/etc``).
    """
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


class Extractor:
    """Owns every write of one layer into ``root``; refuses anything that would leave it."""

    def __init__(self, root: Path, what: str):
        self.root = str(root)
        self.what = what
        self.report = Report()
        self.kinds: dict[str, str] = {"": "dir"}   # what this layer made at each path
        self.dir_times: list[tuple[str, int]] = []

    def fail(self, entry: str, why: str) -> LayerError:
        return LayerError(f"{self.what}: entry {entry!r}: {why}; layer refused")

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _parents(self, rel: str, entry: str) -> None:
        """Make sure every parent of ``rel`` is a real folder inside the root, made if missing."""
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            sub = "/".join(parts[:i + 1])
            kind = self.kinds.get(sub)
            if kind == "dir":
                continue
            if kind is not None:
                raise self.fail(entry, f"its parent {sub!r} is a {kind}, not a folder")
            full = self.path(sub)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                os.mkdir(full, 0o755)
                self.kinds[sub] = "dir"
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self.fail(entry, f"its parent {sub!r} is not a folder")
            self.kinds[sub] = "dir"

    def _clear(self, rel: str, entry: str, new_is_dir: bool) -> bool:
        """Remove what stands at ``rel`` unless both are folders (then True: merge)."""
        full = self.path(rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return False
        self.report.duplicates.append(entry)
        if stat.S_ISDIR(st.st_mode):
            if new_is_dir:
                return True
            remove_tree(Path(full))
        else:
            os.unlink(full)
        drop = rel + "/"
        for key in [k for k in self.kinds if k.startswith(drop)]:
            del self.kinds[key]
        self.kinds.pop(rel, None)
        return False

    def _attributes(self, full: str, member: tarfile.TarInfo, rel: str, kind: str) -> None:
        mode = stat.S_IMODE(member.mode)
        if mode & 0o6000:
            self.report.dropped_setid.append(rel)
            mode &= ~0o6000
        mode |= 0o700 if kind == "dir" else 0o600
        if IS_ROOT:
            os.lchown(full, member.uid, member.gid)
        if kind != "symlink":
            os.chmod(full, mode)
        mtime = int(member.mtime) if member.mtime else int(time.time())
        if kind == "dir":
            self.dir_times.append((full, mtime))
        else:
            os.utime(full, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)

    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        entry = member.name
        rel = clean_name(entry)
        if rel is None:
            raise self.fail(entry, "its name climbs out of the layer with '..'")
        base = rel.rsplit("/", 1)[-1]
        if base == WHITEOUT:
            raise self.fail(entry, "a whiteout with an empty name")
        self.report.entries += 1
        if rel == "":
            if not member.isdir():
                raise self.fail(entry, "refusing to change the type of the root folder")
            self._attributes(self.root, member, rel, "dir")
            return
        self._parents(rel, entry)
        full = self.path(rel)
        whiteout = base.startswith(WHITEOUT)
        if member.isdir() and not whiteout:
            if not self._clear(rel, entry, True):
                os.mkdir(full, 0o700)
            self.kinds[rel] = "dir"
            self._attributes(full, member, rel, "dir")
        elif member.isfile() or whiteout:
            self._clear(rel, entry, False)
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if member.isfile() and not whiteout:
                    src = tar.extractfile(member)
                    while chunk := src.read(COPY_CHUNK):
                        out.write(chunk)
            self.kinds[rel] = "file"
            self._attributes(full, member, rel, "file")
        elif member.issym():
            self._clear(rel, entry, False)
            os.symlink(member.linkname, full)
            self.kinds[rel] = "symlink"
            self._attributes(full, member, rel, "symlink")
        elif member.islnk():
            self._hardlink(member, rel, entry, full)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = "device" if (member.ischr() or member.isblk()) else "fifo"
            self.report.skipped.append(f"{rel} ({kind})")
        else:
            self.report.skipped.append(f"{rel} (tar type {member.type!r})")

    def _hardlink(self, member: tarfile.TarInfo, rel: str, entry: str, full: str) -> None:
        target = clean_name(member.linkname)
        if target is None or target == "":
            raise self.fail(entry, f"a hardlink to {member.linkname!r}, outside the layer")
        kind = self.kinds.get(target)
        if kind is None:
            # Its target lives in a lower layer: flattening links it there.
            self.report.external_links[rel] = target
            return
        if kind == "dir":
            raise self.fail(entry, f"a hardlink to the folder {target!r}")
        self._parents(target, entry)      # the target's parents must be real folders too
        self._clear(rel, entry, False)
        os.link(self.path(target), full, follow_symlinks=False)
        self.kinds[rel] = kind

    def finish(self) -> None:
        for full, mtime in reversed(self.dir_times):
            os.utime(full, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)


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


def ingest(blob: BinaryIO, dest: Path, *, digest: str, diff_id: str, media_type: str,
           size: int, max_bytes: int = 64 << 30, catalog: bool = False,
           place: Callable[[Path, Path], None] = replace_dir) -> dict:
    """Unpack one layer blob into ``dest/layerfs`` with ``dest/layer.json``, atomically.

    ``blob`` must verify its own digest at EOF (``BlobStream`` does); the uncompressed stream
    is checked against ``diff_id`` here. Nothing reaches ``dest`` unless both match.
    """
    what = f"layer {digest}"
    temp = temp_sibling(dest)
    try:
        layerfs = temp / "layerfs"
        layerfs.mkdir(mode=0o755)
        buffered = io.BufferedReader(blob, COPY_CHUNK) if not hasattr(blob, "peek") else blob
        plain, found = _decompressor(buffered, compression_of(media_type), what)
        counting = _Counting(plain, max_bytes, what)
        reader = io.BufferedReader(counting, COPY_CHUNK)
        extractor = Extractor(layerfs, what)
        member = None
        try:
            with tarfile.open(fileobj=reader, mode="r|", encoding="utf-8",
                              errors="surrogateescape") as tar:
                for member in tar:
                    extractor.extract(tar, member)
            reader.read()          # padding after the end-of-archive blocks
            counting.drain()
            while buffered.read(COPY_CHUNK):   # trailing bytes of the blob: digest check at EOF
                pass
        except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as exc:
            at = f" at entry {member.name!r}" if member is not None else ""
            raise LayerError(f"{what}: broken or truncated archive{at}: {exc}") from None
        extractor.finish()
        got = "sha256:" + counting.sha.hexdigest()
        if got != diff_id:
            raise LayerError(f"{what}: uncompressed content hashes to {got}, but the image "
                             f"config says diff_id {diff_id}; refused")
        report = extractor.report
        if report.skipped:
            log.warning("%s: %d special file(s) not created: %s", what, len(report.skipped),
                        ", ".join(report.skipped[:5]))
        if report.dropped_setid:
            log.info("%s: set-uid/set-gid dropped on %d file(s)", what, len(report.dropped_setid))
        info = {"digest": digest, "diff_id": diff_id, "size": size, "media_type": media_type,
                "compression": found, "uncompressed_size": counting.count,
                "ingested_at": time.time(), "entries": report.entries,
                "skipped": report.skipped, "dropped_setid": report.dropped_setid,
                "external_links": report.external_links, "duplicates": report.duplicates}
        if catalog:
            (layerfs / CATALOG).touch()     # one nested CVMFS catalog per layer
        (temp / "layer.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        os.chmod(temp, 0o755)
        place(temp, dest)
        return info
    except BaseException:
        remove_tree(temp)
        raise


def read_info(dest: Path) -> dict | None:
    """``layer.json`` of an ingested layer, or None when the layer is absent or incomplete."""
    try:
        return json.loads((dest / "layer.json").read_text())
    except (OSError, ValueError):
        return None
