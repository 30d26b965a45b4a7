"""Bounded memory: ingesting a 1 GiB layer keeps the peak RSS of the process low."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

LIMIT_MIB = 150

CHILD = textwrap.dedent("""
    import hashlib, io, json, os, resource, sys, tarfile
    from isal import igzip
    from pathlib import Path
    from unpacked.image import ingest as layers

    work = Path(sys.argv[1])
    size = 1 << 30
    block = os.urandom(1 << 20)
    blob = work / "blob.gz"
    raw_hash = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner
        def writable(self):
            return True
        def write(self, b):
            raw_hash.update(b)
            return self.inner.write(b)

    with open(blob, "wb") as out, igzip.GzipFile(fileobj=out, mode="wb", compresslevel=0) as gz:
        sink = Hashing(gz)
        with tarfile.open(fileobj=sink, mode="w|") as tar:
            info = tarfile.TarInfo("big.bin")
            info.size = size
            class Gen(io.RawIOBase):
                left = size
                def readable(self):
                    return True
                def readinto(self, b):
                    n = min(len(b), len(block), self.left)
                    b[:n] = block[:n]
                    self.left -= n
                    return n
            tar.addfile(info, io.BufferedReader(Gen(), 1 << 20))
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    print(json.dumps({"digest": "sha256:" + h.hexdigest(),
                      "diff_id": "sha256:" + raw_hash.hexdigest(), "size": blob.stat().st_size,
                      "generate_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

INGEST = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from unpacked.image import ingest as layers

    def hwm_kib():
        # VmHWM belongs to this process image; ru_maxrss would carry the parent's over exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    work, meta = Path(sys.argv[1]), json.loads(sys.argv[2])
    before = hwm_kib()
    with open(work / "blob.gz", "rb") as f:
        info = layers.ingest(f, work / "layers" / "x", digest=meta["digest"],
                             diff_id=meta["diff_id"], size=meta["size"],
                             media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    peak = hwm_kib()
    print(json.dumps({"before_kib": before, "peak_kib": peak,
                      "bytes": info["uncompressed_size"]}))
""")


def test_peak_rss_of_a_1gib_ingest(tmp_path):
    (tmp_path / "layers").mkdir()
    made = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, "-c", INGEST, str(tmp_path), made.stdout],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["bytes"] > 1 << 30
    peak_mib = figures["peak_kib"] / 1024
    print(f"peak RSS while ingesting 1 GiB: {peak_mib:.0f} MiB "
          f"(at start {figures['before_kib'] / 1024:.0f} MiB)")
    assert peak_mib < LIMIT_MIB
    assert (tmp_path / "layers/x/layerfs/big.bin").stat().st_size == 1 << 30
