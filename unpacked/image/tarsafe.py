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
_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class HeaderTooLarge(tarfile.TarError):
    pass


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized extended headers before reading them."""

    def _proc_member(self, tarfile_obj):
        if self.type in _LONG and self.size > MAX_HEADER:
            raise HeaderTooLarge(f"an extended header of {self.size:,} bytes (more than "
                                 f"{MAX_HEADER:,})")
        return super()._proc_member(tarfile_obj)


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
