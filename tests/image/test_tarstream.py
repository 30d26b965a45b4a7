"""The tar reader: it reads what GNU tar writes, in every format, as Python's tarfile does (the
oracle), and refuses broken or hostile headers that tarfile reads silently."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest
from helpers.images import Entry, tar_bytes

from unpacked.image import tarstream
from unpacked.image.tarstream import HeaderTooLarge, TarError, TarReader, Truncated


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


def test_pax_records_override_the_header_and_globals_apply_to_what_follows():
    raw = tar_bytes([Entry("a", b"1", pax={"path": "renamed", "uid": "7", "mtime": "5.25"}),
                     Entry("b", b"2")])
    ours = read_all(extension(tarfile.XGLTYPE, record(b"gid", b"4242") + bytes(5)) + raw)
    assert [(m[0], m[3], m[4], m[5]) for m in ours] == [("renamed", 7, 4242, 5),
                                                         ("b", 0, 4242, 1_600_000_000)]


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


def test_global_pax_headers_are_bounded_together():
    """Each global header is under the cap, but they accumulate: refused past it."""
    raw = b"".join(extension(tarfile.XGLTYPE, record(b"k%d" % n, b"v" * 600_000))
                   for n in range(3)) + bytes(1024)
    with pytest.raises(HeaderTooLarge, match="global pax headers"):
        read_all(raw)


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
