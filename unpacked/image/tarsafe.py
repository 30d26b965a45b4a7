"""Reading a hostile tar stream with bounded memory.

Python's ``tarfile`` reads a pax or GNU long-name header whole into memory, and in stream mode
keeps every member it has seen. ``members`` caps the first (a header larger than
``MAX_HEADER`` is refused before it is read) and forgets the second, so memory does not grow
with header sizes or with the number of entries.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

MAX_HEADER = 1 << 20        # a pax or GNU long-name header this large is an attack
MAX_NAME = 4095             # PATH_MAX - 1: no real filesystem path is longer
MAX_DEPTH = 512
MAX_SPARSE = 10_000         # regions of one sparse file (GNU old format, or pax 1.0 map)
_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class HeaderTooLarge(tarfile.TarError):
    pass


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized extended headers and sparse maps before reading
    them whole (CPython's own parsing, with bounds)."""

    def _proc_member(self, tarfile_obj):
        if self.type in _LONG and self.size > MAX_HEADER:
            raise HeaderTooLarge(f"an extended header of {self.size:,} bytes (more than "
                                 f"{MAX_HEADER:,})")
        return super()._proc_member(tarfile_obj)

    def _proc_sparse(self, tarfile_obj):
        """GNU's old sparse format: 21 regions per extension block, as many blocks as the
        archive says; at most MAX_SPARSE regions here."""
        structs, extended, original = self._sparse_structs
        del self._sparse_structs
        while extended:
            if len(structs) > MAX_SPARSE:
                raise HeaderTooLarge(f"a sparse file of more than {MAX_SPARSE:,} regions")
            buf = tarfile_obj.fileobj.read(tarfile.BLOCKSIZE)
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos:pos + 12])
                    numbytes = tarfile.nti(buf[pos + 12:pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            extended = len(buf) == tarfile.BLOCKSIZE and bool(buf[504])
        self.sparse = structs
        self.offset_data = tarfile_obj.fileobj.tell()
        tarfile_obj.offset = self.offset_data + self._block(self.size)
        self.size = original
        return self

    def _proc_gnusparse_10(self, next, pax_headers, tarfile_obj):
        """GNU's pax sparse format 1.0: the map is a count, then numbers, in the data."""
        buf = tarfile_obj.fileobj.read(tarfile.BLOCKSIZE)
        fields, buf = buf.split(b"\n", 1)
        fields = int(fields)
        if not 0 <= fields <= MAX_SPARSE:
            raise HeaderTooLarge(f"a sparse map of {fields:,} regions")
        numbers: list[int] = []
        while len(numbers) < fields * 2:
            if b"\n" not in buf:
                more = tarfile_obj.fileobj.read(tarfile.BLOCKSIZE)
                if not more or len(buf) > 64 * 1024:
                    raise tarfile.ReadError("a broken sparse map")
                buf += more
            number, buf = buf.split(b"\n", 1)
            numbers.append(int(number))
        next.offset_data = tarfile_obj.fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


def open_stream(fileobj: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="r|", encoding="utf-8", errors="surrogateescape",
                        tarinfo=BoundedTarInfo)


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a stream, forgetting each once the next is read."""
    while True:
        member = tar.next()
        if member is None:
            return
        tar.members.clear()        # stream mode keeps every member otherwise
        yield member
