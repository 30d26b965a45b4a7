"""Reading a hostile tar stream: one pass, bounded memory, strict headers.

Why not ``tarfile``: it spends ~25 µs of Python per entry (header objects, a file object per
member, a member list to forget), which made it the largest cost of a layer of small files;
this reader spends ~4. It also stops silently at a broken header after the first member, and
reads pax and long-name headers whole, however large. Here every header is checked (checksum,
numbers, sizes), extended headers are capped at ``MAX_HEADER`` (global ones together), sparse
maps at ``MAX_SPARSE`` regions, and a stream that ends inside a header or its data is
"truncated". The formats are those of GNU tar, Go's ``archive/tar`` and ``tarfile``: v7, ustar
(with its name prefix), GNU (long names, old sparse files), pax (``x``/``g``, sparse 0.0, 0.1
and 1.0). What a member *means* (its path, its target) is the extractor's business.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 512
MAX_HEADER = 1 << 20        # a pax or GNU long-name header this large is an attack
MAX_NAME = 4095             # PATH_MAX - 1: no real filesystem path is longer
MAX_DEPTH = 512
MAX_SPARSE = 10_000         # regions of one sparse file

REGULAR, DIRECTORY, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO = "0", "5", "2", "1", "3", "4", "6"
_REGULAR_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR}
_HEADER_ONLY = {b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCKDEV, b"5": DIRECTORY,
                b"6": FIFO}
_ZERO = bytes(BLOCK)
_EMPTY_NUMBER = bytes(12)
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_PAX_TIME = re.compile(rb"-?[0-9]{1,30}(?:\.[0-9]*)?")
_SPARSE_NUMBER = re.compile(rb"[0-9]{1,20}")


class TarError(Exception):
    """The stream is not a well-formed tar archive (the message says where and why)."""


class Truncated(TarError):
    pass


class HeaderTooLarge(TarError):
    pass


@dataclass(slots=True)
class Member:
    """One entry: ``kind`` is one of the type constants above or the raw type for others;
    ``size`` is the content's length (a sparse file's apparent size); ``sparse`` the
    (offset, length) regions its stored data fills, in order, or None."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    linkname: str
    sparse: list[tuple[int, int]] | None = None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cut(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _number(field: bytes) -> int:
    """An octal header number (NUL/space padded), or GNU's base-256 form; never negative."""
    digits = field[:-1]
    if field[-1] == 0 and digits.isdigit():          # as nearly every writer puts it
        return int(digits, 8)
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise TarError(f"a negative number {field!r} in a header")
    digits = _cut(field).strip(b" ")
    if not digits:
        return 0
    if not digits.isdigit():
        raise TarError(f"{digits[:20]!r} in a header is not an octal number")
    return int(digits, 8)          # ValueError on 8 or 9: turned into a TarError by the caller


def _time(field: bytes) -> int:
    """A header time; GNU writes one before 1970 negative in base-256: 0 here, which the
    extractor makes today, as any absurd time."""
    return 0 if field[:1] == b"\xff" else _number(field)


def _checksum_ok(block: bytes, stored: bytes) -> bool:
    """The sum of the header's bytes with its checksum field as spaces, unsigned (POSIX) or
    signed (old Sun tar). Adler-32's first half is 1 + the byte sum mod 65521; 256 bytes
    cannot pass 65,280, so two halves give the exact sum at C speed."""
    want = _number(stored)
    total = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    total += 256 - sum(block[148:156])
    if total == want:
        return True
    high = sum(1 for byte in block if byte >= 128) - sum(1 for b in block[148:156] if b >= 128)
    return total - 256 * high == want


def _pax_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``"<length> <key>=<value>\\n"`` records; NUL padding may follow them, nothing else."""
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:
            if data.count(0, pos) != end - pos:
                raise TarError("a pax header with data after a NUL byte")
            return
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarError("a pax header record without its length")
        length = int(digits)
        last = pos + length - 1
        if length <= space - pos + 2 or last >= end or data[last] != 0x0A:
            raise TarError("a pax header record with a wrong length")
        key, eq, value = data[space + 1:last].partition(b"=")
        if not eq or not key:
            raise TarError("a pax header record without a key")
        yield key, value
        pos += length


def _local(records: Iterator[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """A member's pax records. An empty value removes its keyword (the header's own field
    counts, as POSIX and Go's archive/tar have it); sparse format 0.0 repeats its offset and
    numbytes keys, which become one map as format 0.1 writes it."""
    pax: dict[bytes, bytes] = {}
    pairs: list[bytes] = []
    for key, value in records:
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            if (key == b"GNU.sparse.offset") != (len(pairs) % 2 == 0):
                raise TarError("a broken sparse map")
            pairs.append(value)
        elif value:
            pax[key] = value
        else:
            pax.pop(key, None)
    if pairs:
        pax[b"GNU.sparse.map"] = b",".join(pairs)
    return pax


def _check_sparse(regions: list[tuple[int, int]], real_size: int, stored: int) -> None:
    """Regions in order, inside the file, holding exactly the stored bytes."""
    end = 0
    for offset, length in regions:
        if offset < end or offset + length > real_size:
            raise TarError("a sparse map with regions out of order or past the file's end")
        end = offset + length
    if sum(length for _, length in regions) != stored:
        raise TarError("a sparse map that does not match the data stored")


def _pax_int(value: bytes, key: bytes) -> int:
    """A pax number: decimal, never negative. An owner or a size that is not one refuses the
    archive (``tarfile`` reads it as 0, i.e. root)."""
    if not value.isdigit() or len(value) > 20:
        raise TarError(f"pax {_text(key)!r} is not a number (or past any real one)")
    return int(value)


def _pax_time(value: bytes) -> int:
    """A pax time (seconds, maybe with a fraction); one that is not a number is 0 and the
    extractor makes it today, as it does any absurd time."""
    if not _PAX_TIME.fullmatch(value):
        return 0
    return int(value.partition(b".")[0])


class TarReader:
    """Members of a stream, one at a time. ``pull()`` returns the next piece of the stream
    (``b""`` at its end); a member's stored data must be read with ``chunks`` before the
    next member is asked for, or it is skipped."""

    def __init__(self, pull: Callable[[], bytes]):
        self._pull = pull
        self._buf, self._pos = b"", 0
        self._left = 0                  # stored bytes of the current member not read yet
        self._pad = 0                   # and the padding after them

    # -- the byte stream ----------------------------------------------------------------------

    def _fill(self, n: int) -> bool:
        """At least ``n`` bytes buffered; False at the stream's end."""
        rest = self._buf[self._pos:]
        pieces, have = [rest], len(rest)
        while have < n:
            piece = self._pull()
            if not piece:
                break
            pieces.append(piece)
            have += len(piece)
        self._buf, self._pos = b"".join(pieces), 0
        return have >= n

    def _take(self, n: int, what: str) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf) and not self._fill(n):
            raise Truncated(f"the archive ends inside {what}")
        pos = self._pos
        self._pos = pos + n
        return self._buf[pos:pos + n]

    def _skip(self, n: int) -> None:
        buffered = len(self._buf) - self._pos
        if n <= buffered:
            self._pos += n
            return
        n -= buffered
        self._buf, self._pos = b"", 0
        while n > 0:
            piece = self._pull()
            if not piece:
                raise Truncated("the archive ends inside a member's data")
            if len(piece) > n:
                self._buf, self._pos = piece, n
                return
            n -= len(piece)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The current member's stored data, in pieces of at most ``size`` bytes."""
        while self._left:
            if self._pos >= len(self._buf):
                self._buf, self._pos = self._pull(), 0
                if not self._buf:
                    raise Truncated("the archive ends inside a member's data")
            pos = self._pos
            n = min(self._left, len(self._buf) - pos, size)
            self._pos, self._left = pos + n, self._left - n
            yield self._buf[pos:pos + n]
        self._skip_pad()

    def data(self) -> bytes:
        """The current member's stored data at once: for small members only."""
        piece = self._take(self._left, "a member's data")
        self._left = 0
        self._skip_pad()
        return piece

    def _skip_pad(self) -> None:
        if self._pad:
            self._skip(self._pad)
            self._pad = 0

    def _skip_data(self) -> None:
        """What is left of the current member's data, unread, and its padding."""
        if self._left or self._pad:
            self._skip(self._left + self._pad)
            self._left = self._pad = 0

    def _start_data(self, stored: int) -> None:
        self._left, self._pad = stored, -stored % BLOCK

    def rest(self) -> None:
        """Read what follows the archive (its end blocks, padding) to the stream's end."""
        self._buf, self._pos = b"", 0
        while self._pull():
            pass

    # -- headers ------------------------------------------------------------------------------

    def _extension(self, size: int) -> bytes:
        if size > MAX_HEADER:
            raise HeaderTooLarge(f"an extended header of {size:,} bytes (more than "
                                 f"{MAX_HEADER:,})")
        self._start_data(size)
        return self.data()

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip_data()
            member = self._next()
            if member is None:
                return
            yield member

    def _block(self) -> bytes | None:
        """The next header block, or None at a clean end of the stream."""
        pos = self._pos
        if pos + BLOCK > len(self._buf) and not self._fill(BLOCK):
            if len(self._buf) == self._pos:
                return None
            raise Truncated("the archive ends inside a header")
        pos = self._pos
        self._pos = pos + BLOCK
        return self._buf[pos:pos + BLOCK]

    def _next(self) -> Member | None:
        """The next member with its extended headers applied, as Go's archive/tar does: the
        last pax header before a member is its own (an earlier one is dropped, so they cannot
        pile up), a GNU long name or link wins over pax, and a global pax header is read past
        and changes nothing (Docker ignores them too: one could move every later member's
        boundary with ``size`` or rename them all with ``path``)."""
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            block = self._block()
            if block is None:
                return None
            if block == _ZERO:
                second = self._block()
                if second is not None and second != _ZERO:
                    raise TarError("one empty block inside the archive, then more members")
                return None            # the end (what follows is read by ``rest``)
            try:
                fields = _HEADER.unpack(block)
                if not _checksum_ok(block, fields[6]):
                    raise TarError("a header with a wrong checksum (not a tar archive, "
                                   "or a corrupt one)")
                size = _number(fields[4])
            except ValueError:
                raise TarError("a header field is not an octal number") from None
            kind = fields[7]
            if kind in (b"x", b"X"):
                pax = _local(_pax_records(self._extension(size)))
            elif kind == b"g":
                self._start_data(size)
                self._skip_data()
            elif kind == b"L":
                long_name = _cut(self._extension(size))
            elif kind == b"K":
                long_link = _cut(self._extension(size))
            else:
                try:
                    return self._member(block, fields, size, pax, long_name, long_link)
                except ValueError:
                    raise TarError("a header field is not an octal number") from None

    def _member(self, block: bytes, fields: tuple, size: int, pax: dict[bytes, bytes],
                long_name: bytes | None, long_link: bytes | None) -> Member:
        (name, mode, uid, gid, _, mtime, _, raw_kind, link, magic, _, _, _, _, _, prefix) = fields
        name = _cut(name)
        if magic == b"ustar\0" and prefix[0]:
            name = _cut(prefix) + b"/" + name
        link = _cut(link)
        mode, uid, gid, mtime = _number(mode), _number(uid), _number(gid), _time(mtime)
        sparse = None
        real_size = size
        if raw_kind == b"S" and magic == b"ustar ":     # GNU's; in another format, unknown
            sparse, real_size = self._old_sparse(block)
            raw_kind = b"0"
        if pax:
            header = [name, link, uid, gid, mtime, size, real_size, sparse]
            name, link, uid, gid, mtime, size, real_size, sparse = self._pax(pax, header)
        name = long_name if long_name is not None else name
        link = long_link if long_link is not None else link
        kind = _REGULAR_TYPES.get(raw_kind)
        if kind is not None and raw_kind == b"\0" and name.endswith(b"/"):
            kind = DIRECTORY                        # v7: a folder is a file named "x/"
        elif kind is None:
            kind = _HEADER_ONLY.get(raw_kind)
        if sparse is not None:
            if kind != REGULAR:
                raise TarError("a sparse map on a member that is not a file")
            _check_sparse(sparse, real_size, size)
        if kind is None:
            kind = _text(raw_kind)                  # unknown: its data is skipped
            self._start_data(size)
        elif kind == REGULAR:
            self._start_data(size)
        else:
            real_size = 0
        if kind == DIRECTORY:
            name = name.rstrip(b"/") or name[:1]
        return Member(_text(name), kind, mode, uid, gid, mtime, real_size, _text(link), sparse)

    def _pax(self, pax: dict[bytes, bytes], header: list) -> list:
        """The header's name, link, uid, gid, mtime, stored and real size and sparse map,
        as the member's pax records replace them."""
        name, link, uid, gid, mtime, size, real_size, sparse = header
        name = pax.get(b"path", name)
        if b"size" in pax:
            size = real_size = _pax_int(pax[b"size"], b"size")
        if b"GNU.sparse.realsize" in pax or b"GNU.sparse.size" in pax:
            name, sparse, real_size, size = self._pax_sparse(pax, name, size)
        return [name, pax.get(b"linkpath", link),
                _pax_int(pax[b"uid"], b"uid") if b"uid" in pax else uid,
                _pax_int(pax[b"gid"], b"gid") if b"gid" in pax else gid,
                _pax_time(pax[b"mtime"]) if b"mtime" in pax else mtime,
                size, real_size, sparse]

    # -- sparse files -------------------------------------------------------------------------

    def _old_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        """GNU's old format: 4 regions in the header, 21 per extension block after it."""
        regions = self._regions(block, 386, 4)
        extended, real_size = block[482], _number(block[483:495])
        while extended:
            if len(regions) > MAX_SPARSE:
                raise HeaderTooLarge(f"a sparse file of more than {MAX_SPARSE:,} regions")
            more = self._take(BLOCK, "a sparse header")
            regions += self._regions(more, 0, 21)
            extended = more[504]
        return regions, real_size

    @staticmethod
    def _regions(block: bytes, start: int, count: int) -> list[tuple[int, int]]:
        regions = []
        for pos in range(start, start + 24 * count, 24):
            offset, length = block[pos:pos + 12], block[pos + 12:pos + 24]
            if offset == _EMPTY_NUMBER and length == _EMPTY_NUMBER:
                break
            regions.append((_number(offset), _number(length)))
        return regions

    def _pax_sparse(self, pax: dict[bytes, bytes], name: bytes, stored: int
                    ) -> tuple[bytes, list[tuple[int, int]], int, int]:
        """GNU's pax sparse formats: 0.0 (offset/numbytes records), 0.1 (one map record)
        and 1.0 (the map at the head of the data). Returns name, map, real and stored size."""
        name = pax.get(b"GNU.sparse.name", name)
        real = pax.get(b"GNU.sparse.size", pax.get(b"GNU.sparse.realsize"))
        if real is None:
            raise TarError("a pax sparse file without its real size")
        real_size = _pax_int(real, b"GNU.sparse.realsize")
        if pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            numbers, used = self._sparse_map(stored)
            stored -= used
        elif b"GNU.sparse.map" in pax:
            numbers = pax[b"GNU.sparse.map"].split(b",")
        else:
            raise TarError("a pax sparse file without its map")
        if len(numbers) > 2 * MAX_SPARSE:
            raise HeaderTooLarge(f"a sparse file of more than {MAX_SPARSE:,} regions")
        if len(numbers) % 2 or not all(_SPARSE_NUMBER.fullmatch(n) for n in numbers):
            raise TarError("a broken sparse map")
        values = [int(n) for n in numbers]
        regions = list(zip(values[::2], values[1::2], strict=True))
        return name, regions, real_size, stored

    def _sparse_map(self, stored: int) -> tuple[list[bytes], int]:
        """Format 1.0: a count, then offset and length lines, padded to a block. Newlines are
        counted block by block and the lines split once (a long map costs one pass)."""
        blocks, limit = [], min(stored, (2 * MAX_SPARSE + 1) * 21 + BLOCK)
        count, lines = None, 0
        while count is None or lines < 2 * count + 1:
            if (len(blocks) + 1) * BLOCK > limit:
                raise TarError("a broken sparse map")
            block = self._take(BLOCK, "a sparse map")
            blocks.append(block)
            lines += block.count(b"\n")
            if count is None and lines:
                first = b"".join(blocks).partition(b"\n")[0]
                if not _SPARSE_NUMBER.fullmatch(first):
                    raise TarError("a broken sparse map")
                count = int(first)
                if count > MAX_SPARSE:
                    raise HeaderTooLarge(f"a sparse file of more than {MAX_SPARSE:,} regions")
        numbers = b"".join(blocks).split(b"\n")
        return numbers[1:2 * count + 1], len(blocks) * BLOCK
