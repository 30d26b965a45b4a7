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
    for row in ("cold convert app, hardlink (ours)", "skopeo copy + umoci unpack",
                "floor, curl|gzip|tar + cp -al", "no-op run, 20 images", "doit list, 20 images",
                "peak memory", "variants: cold convert of 5, -n 1"):
        assert row in text, row
    assert "base fetched 1 time(s)" in text
    downloaded = text.split("bytes downloaded")[0].rsplit(";", 1)[1].strip()
    unique = text.split("the unique blobs are ")[1].split(" bytes")[0]
    assert downloaded == unique, "each shared layer is downloaded once"
    assert "no transaction opened by the no-op runs" in text
