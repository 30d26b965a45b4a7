"""Bounded memory and disk: a layer's shape never makes ingest grow.

Each layer of the corpus is generated as a stream into a file (the test never holds it),
then ingested by a fresh process whose peak RSS (VmHWM) is read: a 1 GiB file, a 1 GiB pax
header in a small blob, a 1 GiB GNU long name, a million entries, a gigabyte of bytes after
the archive's end, and a sparse file claiming 3 GiB under a 1 MiB limit (counted as written,
refused, disk untouched).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import need

LIMIT_MIB = 150

MAKE = textwrap.dedent(r"""
    import hashlib, io, json, os, subprocess, sys, tarfile
    from isal import igzip
    from pathlib import Path

    work, kind = Path(sys.argv[1]), sys.argv[2]
    raw_hash, raw_size = hashlib.sha256(), [0]

    class Sink(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner
        def writable(self):
            return True
        def write(self, b):
            raw_hash.update(b)
            raw_size[0] += len(b)
            return self.inner.write(b)

    class Repeat(io.RawIOBase):
        def __init__(self, size, byte=b"\0"):
            self.left, self.block = size, byte * (1 << 20)
        def readable(self):
            return True
        def readinto(self, b):
            n = min(len(b), len(self.block), self.left)
            b[:n] = self.block[:n]
            self.left -= n
            return n

    def header(name, size, kind=b"0"):
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    blob = work / f"{kind}.gz"
    with open(blob, "wb") as out, igzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        sink = io.BufferedWriter(Sink(gz), 1 << 20)
        if kind == "big-file":
            with tarfile.open(fileobj=sink, mode="w|") as tar:
                info = tarfile.TarInfo("big.bin")
                info.size = 1 << 30
                tar.addfile(info, io.BufferedReader(Repeat(1 << 30, os.urandom(1)), 1 << 20))
        elif kind == "pax-header":
            sink.write(header("PaxHeader", 1 << 30, tarfile.XHDTYPE))
            stream = io.BufferedReader(Repeat(1 << 30, b"a"), 1 << 20)
            while chunk := stream.read(1 << 20):
                sink.write(chunk)
            sink.write(header("f", 0) + bytes(1024))
        elif kind == "long-name":       # GNU's long-name member, a gigabyte long
            sink.write(header("././@LongLink", 1 << 30, tarfile.GNUTYPE_LONGNAME))
            stream = io.BufferedReader(Repeat(1 << 30, b"n"), 1 << 20)
            while chunk := stream.read(1 << 20):
                sink.write(chunk)
            sink.write(header("f", 0) + bytes(1024))
        elif kind == "million":
            with tarfile.open(fileobj=sink, mode="w|") as tar:
                for i in range(1_000_000):
                    info = tarfile.TarInfo(f"d{i % 1000:03d}/f{i}")
                    tar.addfile(info)
        elif kind == "trailing":
            with tarfile.open(fileobj=sink, mode="w|") as tar:
                info = tarfile.TarInfo("small")
                info.size = 5
                tar.addfile(info, io.BytesIO(b"small"))
            stream = io.BufferedReader(Repeat(1 << 30), 1 << 20)
            while chunk := stream.read(1 << 20):
                sink.write(chunk)
        elif kind == "sparse":
            src = work / "sparse-src"
            src.mkdir()
            with open(src / "holes", "wb") as f:
                f.truncate(3 << 30)
            tar = subprocess.run(["tar", "--sparse", "--format=posix", "-C", str(src), "-cf",
                                  "-", "holes"], capture_output=True, check=True)
            sink.write(tar.stdout)
        sink.flush()
    h = hashlib.sha256(blob.read_bytes()) if blob.stat().st_size < (64 << 20) else None
    if h is None:
        h = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    print(json.dumps({"digest": "sha256:" + h.hexdigest(), "size": blob.stat().st_size,
                      "diff_id": "sha256:" + raw_hash.hexdigest(), "raw": raw_size[0]}))
""")

INGEST = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from unpacked.errors import UnpackedError
    from unpacked.image.ingest import Claims, ingest
    from unpacked.repo.layout import Repository

    def hwm_kib():
        # VmHWM belongs to this process image; ru_maxrss would carry the parent's over exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    work, kind, meta, limit = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), \\
        int(sys.argv[4])
    before = hwm_kib()
    claims = Claims(meta["digest"], (meta["diff_id"],),
                    "application/vnd.oci.image.layer.v1.tar+gzip", meta["size"])
    try:
        with open(work / f"{kind}.gz", "rb") as f:
            info = ingest(f, Repository(work / "repo"), claims, max_bytes=limit)
        outcome = {"entries": info["entries"], "bytes": info["uncompressed_size"]}
    except UnpackedError as exc:
        outcome = {"refused": str(exc)}
    print(json.dumps({"before_kib": before, "peak_kib": hwm_kib(), **outcome}))
""")

CORPUS = [
    ("big-file", 64 << 30, "bytes"),
    ("pax-header", 64 << 30, "extended header of 1,073,741,824 bytes"),
    ("long-name", 64 << 30, "extended header of 1,073,741,824 bytes"),
    ("million", 64 << 30, "entries"),
    ("trailing", 64 << 30, "bytes"),
    ("sparse", 1 << 20, "writes more than 1,048,576 bytes"),
]


@pytest.mark.parametrize("kind, limit, expect", CORPUS, ids=[c[0] for c in CORPUS])
def test_peak_rss_stays_bounded(tmp_path, kind, limit, expect):
    if kind == "sparse":
        need("tar")                 # GNU tar writes the sparse member
    made = subprocess.run([sys.executable, "-c", MAKE, str(tmp_path), kind],
                          capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, "-c", INGEST, str(tmp_path), kind, made.stdout,
                           str(limit)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    peak_mib = figures["peak_kib"] / 1024
    print(f"{kind}: peak RSS {peak_mib:.0f} MiB (at start {figures['before_kib'] / 1024:.0f} "
          f"MiB): {figures}")
    assert peak_mib < LIMIT_MIB
    if expect in ("bytes", "entries"):
        assert "refused" not in figures, figures
    else:
        assert expect in figures.get("refused", ""), figures
    if kind == "big-file":
        assert (tmp_path / "repo/.layers").exists()
        assert figures["bytes"] > 1 << 30
    if kind == "million":
        assert figures["entries"] == 1_000_000
    if kind == "sparse":
        usage = subprocess.run(["du", "-sk", str(tmp_path / "repo")], capture_output=True,
                               text=True).stdout.split()[0]
        assert int(usage) < 10_000, "the refused sparse file did not fill the disk"
