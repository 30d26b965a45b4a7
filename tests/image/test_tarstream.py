"""The tar reader: it reads what GNU tar writes, in every format, as Python's tarfile does (the
oracle), and refuses broken or hostile headers that tarfile reads silently."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc

import pytest
from helpers.images import Entry, tar_bytes

from unpacked.image import tarstream
from unpacked.image.tarstream import TarError, TarReader, Truncated


def pieces(raw: bytes, size: int = 700):
    """A stream that hands out odd-sized pieces, so headers and data straddle them."""
    chunks = iter([raw[i:i + size] for i in range(0, len(raw), size)] + [b""])
    return lambda: next(chunks, b"")


def read_all(raw: bytes, size: int = 700) -> list[tuple]:
    reader = TarReader(pieces(raw, size))
    out = []
    for m in reader:
        data = b"".join(reader.chunks(333)) if m.kind == tarstream.REGULAR else None
        out.append((m.name, m.kind, m.mode, m.uid, m.gid, m.mtime, m.linkname, data, m.sparse))
    reader.rest()
    return out


def oracle(raw: bytes) -> list[tuple]:
    """The same fields as Python's tarfile reads them (a sparse file's stored data as is)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        for m in tar:
            kind = {b"\0": "0", b"7": "0", b"S": "0"}.get(m.type, m.type.decode())
            data = None
            if m.isreg():
                data = tar.extractfile(m).read()
                if m.sparse is not None:
                    data = b"".join(data[o:o + n] for o, n in m.sparse)
            regions = None if m.sparse is None else \
                [tuple(r) for r in m.sparse if tuple(r) != (0, 0)]
            out.append((m.name, kind, m.mode, m.uid, m.gid, int(m.mtime), m.linkname, data,
                        regions))
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files every format must carry: long names and targets, links, unicode, a fifo, holes."""
    if not shutil.which("tar"):
        pytest.skip("GNU tar is needed to write the archives")
    root = tmp_path_factory.mktemp("tree")
    deep = root / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("n" * 150)).write_bytes(b"long")
    (root / "ünï").write_text("u")
    (root / "small").write_bytes(os.urandom(1000))
    os.symlink("x" * 150, root / "longlink")
    os.link(root / "small", root / "hard")
    os.mkfifo(root / "fifo")
    with open(root / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"end")
    os.utime(root / "small", (1_500_000_000, 1_500_000_000))
    return root


@pytest.mark.parametrize("args", [["--format=gnu"], ["--format=oldgnu"], ["--format=posix"],
                                  ["--format=gnu", "--sparse"],
                                  ["--format=oldgnu", "--sparse"],
                                  ["--format=posix", "--sparse", "--sparse-version=0.0"],
                                  ["--format=posix", "--sparse", "--sparse-version=0.1"],
                                  ["--format=posix", "--sparse", "--sparse-version=1.0"]])
def test_reads_gnu_tar_as_tarfile_does(tree, args):
    raw = subprocess.run(["tar", *args, "-C", str(tree), "-cf", "-", "."], check=True,
                         capture_output=True).stdout
    ours, theirs = read_all(raw), oracle(raw)
    assert ours == theirs
    assert any(m[0].endswith("n" * 150) for m in ours) and any(m[8] for m in ours) == \
        ("--sparse" in args)


@pytest.mark.parametrize("fmt", ["ustar", "v7"])
def test_reads_short_formats(tmp_path, fmt):
    """ustar joins its name prefix; v7 marks a folder by a trailing slash."""
    width = 90 if fmt == "ustar" else 40             # v7 holds 100 bytes of name, no more
    deep = tmp_path / ("p" * width) / ("q" * width)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"z")
    os.symlink("f", deep / "l")
    raw = subprocess.run(["tar", f"--format={fmt}", "-C", str(tmp_path), "-cf", "-", "."],
                         check=True, capture_output=True).stdout
    ours = read_all(raw)
    assert ours == oracle(raw)
    assert ("./" + "p" * width + "/" + "q" * width, tarstream.DIRECTORY) in \
        [m[:2] for m in ours]


def test_pax_records_override_the_header_the_last_header_counts_globals_change_nothing():
    """As Go's archive/tar: of two pax headers before a member only the last applies (they
    cannot pile up in memory); a global header is read past (its ``size`` would otherwise
    move every later member's boundary, its ``path`` rename them all); an empty value keeps
    the header's own field."""
    raw = tar_bytes([Entry("a", b"1", pax={"path": "renamed", "uid": "7", "mtime": "5.25"}),
                     Entry("b", b"2", uid=3)])
    first = extension(tarfile.XHDTYPE, record(b"path", b"dropped") + record(b"gid", b"9"))
    glob = extension(tarfile.XGLTYPE, record(b"size", b"0") + record(b"path", b"etc/passwd"))
    empty = extension(tarfile.XHDTYPE, record(b"uid", b""))
    second = raw.index(b"b\0")
    raw = first + raw[:second] + glob + empty + raw[second:]
    ours = read_all(raw)
    assert [(m[0], m[3], m[4], m[5], m[7]) for m in ours] == [
        ("renamed", 7, 0, 5, b"1"), ("b", 3, 0, 1_600_000_000, b"2")]


def test_a_gnu_long_name_wins_over_a_pax_path():
    long = "l" * 150
    raw = tar_bytes([Entry(long, b"1")], fmt=tarfile.GNU_FORMAT)
    assert raw[156:157] == b"L"
    raw = extension(tarfile.XHDTYPE, record(b"path", b"pax-name")) + raw
    assert [m[0] for m in read_all(raw)] == [long]


def record(key: bytes, value: bytes) -> bytes:
    """One pax record, its length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return b"%d" % length + body


def extension(kind: bytes, records: bytes) -> bytes:
    """A pax header block of ``kind`` holding ``records``."""
    info = tarfile.TarInfo("pax")
    info.type, info.size = kind, len(records)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def corrupt(raw: bytes, at: int, value: bytes, fix_sum: bool = True) -> bytes:
    """``raw`` with bytes changed in the header block at ``at``, its checksum made right."""
    block = bytearray(raw[at:at + 512])
    block[:len(value)] = value
    if fix_sum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    return raw[:at] + bytes(block) + raw[at + 512:]


def test_a_broken_header_after_the_first_is_refused_not_taken_for_the_end():
    """tarfile ends the archive silently at a bad checksum after its first member, dropping
    the rest of the layer; here it is an error."""
    raw = tar_bytes([Entry("a", b"1"), Entry("b", b"2")], fmt=tarfile.USTAR_FORMAT)
    broken = raw[:1024] + b"X" + raw[1025:]
    with tarfile.open(fileobj=io.BytesIO(broken), mode="r|") as tar:
        assert [m.name for m in tar] == ["a"]          # what tarfile does
    with pytest.raises(TarError, match="wrong checksum"):
        read_all(broken)


@pytest.mark.parametrize("cut", [100, 512 + 1, 1024 + 300])
def test_a_stream_ending_inside_a_header_or_its_data_is_truncated(cut):
    raw = tar_bytes([Entry("a", b"x" * 600), Entry("b", b"2")], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(Truncated):
        read_all(raw[:cut])


def test_a_stream_ending_at_a_header_boundary_ends_the_archive():
    """As Go's archive/tar and tarfile do: the end blocks are optional."""
    raw = tar_bytes([Entry("a", b"1")], fmt=tarfile.USTAR_FORMAT)
    assert [m[0] for m in read_all(raw[:1024])] == ["a"]


@pytest.mark.parametrize("field, value, message", [
    (124, b"12345678\0\0\0\0", "not an octal number"),   # an 8 in an octal size
    (124, b"\xff" + bytes(11), "negative"),              # base-256, negative
    (108, b"0x123\0", "not an octal number"),
])
def test_header_numbers_are_checked(field, value, message):
    raw = tar_bytes([Entry("a", b"1")], fmt=tarfile.USTAR_FORMAT)
    block = bytearray(raw[:512])
    block[field:field + len(value)] = value
    with pytest.raises(TarError, match=message):
        read_all(corrupt(raw, 0, bytes(block)))


def test_base256_sizes_are_read():
    raw = tar_bytes([Entry("a", b"hello")], fmt=tarfile.USTAR_FORMAT)
    block = bytearray(raw[:512])
    block[124:136] = b"\x80" + (5).to_bytes(11, "big")
    assert read_all(corrupt(raw, 0, bytes(block)))[0][7] == b"hello"


@pytest.mark.parametrize("pax, message", [({"uid": "abc"}, "'uid' is not a number"),
                                          ({"gid": "-1"}, "'gid' is not a number"),
                                          ({"size": "9" * 30}, "'size' is not a number")])
def test_pax_owners_and_sizes_that_are_not_numbers_are_refused(pax, message):
    """tarfile makes such an owner 0 (root)."""
    with pytest.raises(TarError, match=message):
        read_all(tar_bytes([Entry("a", b"1", pax=pax)]))


def test_a_chain_of_pax_headers_does_not_pile_up():
    """Each header is under the cap; before, their records accumulated without bound."""
    raw = b"".join(extension(tarfile.XHDTYPE, record(b"k%d" % n, b"v" * 900_000))
                   for n in range(40)) + tar_bytes([Entry("a", b"1")], fmt=tarfile.USTAR_FORMAT)
    reader = TarReader(pieces(raw, 1 << 20))
    tracemalloc.start()
    try:
        member = next(iter(reader))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert member.name == "a"
    assert peak < 8 << 20, f"{peak:,} bytes held for 40 headers of 900 kB"


def test_one_empty_block_then_members_is_refused():
    """Go refuses it; an archive that ends with one empty block is fine."""
    raw = tar_bytes([Entry("a", b"1"), Entry("b", b"2")], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(TarError, match="one empty block"):
        read_all(raw[:1024] + bytes(512) + raw[1024:])
    assert [m[0] for m in read_all(raw[:1024] + bytes(512))] == ["a"]


def test_data_after_a_nul_in_a_pax_header_is_refused():
    raw = extension(tarfile.XHDTYPE, record(b"uid", b"1") + b"\0" + record(b"path", b"x"))
    with pytest.raises(TarError, match="after a NUL"):
        read_all(raw + tar_bytes([Entry("a", b"1")], fmt=tarfile.USTAR_FORMAT))


def old_sparse(regions: list[tuple[int, int]], real: int, magic: bytes) -> bytes:
    """An old GNU sparse header (type S) with ``regions`` and the data they hold."""
    info = tarfile.TarInfo("holes")
    info.size = sum(n for _, n in regions)
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[156:157] = b"S"
    block[257:265] = magic
    for i, (offset, length) in enumerate(regions):
        block[386 + 24 * i:410 + 24 * i] = b"%011o\0%011o\0" % (offset, length)
    block[483:495] = b"%011o\0" % real
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    data = b"d" * info.size
    return bytes(block[:512]) + data + bytes(-len(data) % 512)


def test_old_sparse_needs_gnu_magic_and_a_size_that_fits_its_map():
    """An S member of another format is an unknown type (as Go reads it); a pax ``size``
    that contradicts the map is refused instead of running out of data later."""
    member = old_sparse([(0, 512), (4096, 512)], 8192, b"ustar  \0")
    assert read_all(member + bytes(1024))[0][8] == [(0, 512), (4096, 512)]
    posix = old_sparse([(0, 512), (4096, 512)], 8192, b"ustar\x0000")
    assert read_all(posix + bytes(1024))[0][1] == "S"
    with pytest.raises(TarError, match="sparse map"):
        read_all(extension(tarfile.XHDTYPE, record(b"size", b"512")) + member + bytes(1024))


def test_a_sparse_map_on_a_symlink_is_refused():
    """Its map would be read from data a symlink does not have: what follows would be
    parsed as members other readers never see."""
    link = tarfile.TarInfo("l")
    link.type, link.linkname, link.size = tarfile.SYMTYPE, "t", 512
    pax = record(b"GNU.sparse.major", b"1") + record(b"GNU.sparse.minor", b"0") + \
        record(b"GNU.sparse.realsize", b"10")
    raw = extension(tarfile.XHDTYPE, pax) + link.tobuf(format=tarfile.USTAR_FORMAT)
    hidden = tar_bytes([Entry("hidden", b"x")], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(TarError, match="not a file"):
        read_all(raw + b"1\n0\n10\n".ljust(512, b"\0") + hidden)


def test_a_time_before_1970_is_read(tmp_path):
    """GNU tar writes it negative in base-256: read (the extractor makes it today)."""
    (tmp_path / "old").write_bytes(b"o")
    os.utime(tmp_path / "old", (-86400, -86400))
    raw = subprocess.run(["tar", "--format=gnu", "-C", str(tmp_path), "-cf", "-", "old"],
                         check=True, capture_output=True).stdout
    assert raw[136:137] == b"\xff"
    assert [(m[0], m[5], m[7]) for m in read_all(raw)] == [("old", 0, b"o")]


@pytest.mark.parametrize("records, message", [
    (b"5 a=b\n", "wrong length"), (b"x a=b\n", "without its length"),
    (b"6 ab\n\n", "without a key")])
def test_broken_pax_records_are_refused(records, message):
    raw = extension(tarfile.XHDTYPE, records) + tar_bytes([Entry("a", b"1")],
                                                          fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(TarError, match=message):
        read_all(raw)


@pytest.mark.parametrize("sparse_map, message", [
    ("0,3,0,3", "out of order"),
    ("4096,3,100000000,3", "past the file's end"),
    ("0,2", "does not match the data"),
])
def test_sparse_maps_must_fit_the_file_and_its_data(sparse_map, message):
    raw = tar_bytes([Entry("s", b"abcdef", pax={"GNU.sparse.map": sparse_map,
                                                  "GNU.sparse.size": "10000"})])
    with pytest.raises(TarError, match=message):
        read_all(raw)


def test_unknown_types_skip_their_data_and_header_only_types_have_none():
    raw = bytearray(tar_bytes([Entry("u", b"payload"), Entry("after", b"ok")],
                              fmt=tarfile.USTAR_FORMAT))
    raw[:512] = corrupt(bytes(raw[:512]), 0, bytes(raw[:156]) + b"Z")[:512]
    link = tarfile.TarInfo("l")
    link.type, link.linkname, link.size = tarfile.SYMTYPE, "t", 0
    header = bytearray(link.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = b"%011o\0" % 1024              # a size on a symlink: no data follows
    header = corrupt(bytes(header), 0, bytes(header[:136]))
    ours = read_all(bytes(raw[:2048]) + header + bytes(1024))
    assert [(m[0], m[1], m[7]) for m in ours] == [("u", "Z", None), ("after", "0", b"ok"),
                                                   ("l", "2", None)]
