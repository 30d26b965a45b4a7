"""The benchmark's quick mode runs, so that the benchmark cannot rot (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--images",
                           str(tmp_path / "images"), "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for row in ("cold convert base: ours", "cold convert app: skopeo copy + umoci unpack",
                "cold convert app: pipelined floor", "cold convert app: sequential floor",
                "cold convert wide / pipelined floor", "peak memory, cold convert files",
                "no-op run, 20 images / HEAD floor", "doit list, 20 images",
                "variants: cold convert of 5, -n 1", "| 20 | ", "Growth from the smallest",
                "a tag move changing only the top layer", "profile: cold convert of app",
                "variants, two platforms: cold convert of 5, -n 2",
                "no-op run, 20 two-platform images / single-platform"):
        assert row in text, row
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "base fetched 1 time(s)" in text
    downloaded = text.split("bytes downloaded")[0].rsplit(";", 1)[1].strip()
    unique = text.split("the unique blobs are ")[1].split(" bytes")[0]
    assert downloaded == unique, "each shared layer is downloaded once"
    assert "WAS opened by a no-op run" not in text
    amplification = text.split("a new image on a converted base: ")[1].split(" files")[0]
    assert int(amplification.replace(",", "")) > 0, "the new image's files were counted"
    assert "each cold run's folder" in text
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts, "every run's filesystem is unmounted at the end"
    assert not list((tmp_path / "work").glob(".*.img")), "and its image deleted"
