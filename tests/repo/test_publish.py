"""The local publisher keeps CVMFS's transaction semantics on a plain folder, crash-safe.

The journal is write-ahead: SIGKILL at every step of a transaction, of its publish and of
its recovery (itself killed and replayed) leaves, after recovery, exactly the tree before
the transaction (nothing was published) or after it (the publish was recorded), and at no
moment a public link naming a missing flat image.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unpacked.repo.publish import LocalPublisher, TransactionError

SCRIPT = r"""
import sys
from pathlib import Path
from unpacked.repo.publish import LocalPublisher

root, action = Path(sys.argv[1]), sys.argv[2]
pub = LocalPublisher("r.cern.ch", root)
if action == "recover":
    pub.recover()
    raise SystemExit(0)
pub.begin()
repo = pub.repository()

def place(area_rel, name, text):
    with repo.open_area(area_rel) as area:
        temp = area.make_temp_dir(name)
        with area.child(temp) as folder:
            folder.write_file("f", text.encode())
        repo.place(area, temp, name)

place(".flat", "b" * 64, "new flat")            # a new flat image
place(".flat", "a" * 64, "rebuilt flat")        # replaces an existing one
repo.link("img:new", ".flat/" + "b" * 64)        # a new public link
repo.link("img:old", ".flat/" + "b" * 64)        # a moved one
repo.delete(".layers/" + "c" * 64)               # GC
repo.unlink_public("lib/deep/img:gone")          # a dropped image: its empty folders go too
if action == "publish":
    pub.publish("scripted")
"""


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] == ".unpacked":
            continue
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_text()
        else:
            out[rel] = "dir"
    return out


def broken_links(root: Path) -> list[str]:
    return [str(p) for p in root.iterdir() if p.is_symlink() and not p.exists()]


def seed(root: Path) -> None:
    for rel, text in ((".flat/" + "a" * 64 + "/f", "old flat"),
                      (".layers/" + "c" * 64 + "/layerfs/x", "layer")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "img:old").symlink_to(".flat/" + "a" * 64)
    (root / "lib/deep").mkdir(parents=True)
    (root / "lib/deep/img:gone").symlink_to("../../.flat/" + "a" * 64)


def run(root: Path, action: str, crash: int | None = None, log: Path | None = None):
    env = dict(os.environ)
    env.pop("UNPACKED_CRASH_AT", None)
    if crash is not None:
        env["UNPACKED_CRASH_AT"] = str(crash)
        env["UNPACKED_CRASH_LOG"] = str(log)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(root), action], env=env,
                           capture_output=True, text=True, timeout=60)


def test_writes_need_a_transaction(tmp_path):
    pub = LocalPublisher("r.cern.ch", tmp_path / "r.cern.ch")
    repo = pub.repository()
    with pytest.raises(TransactionError, match="no open transaction"), \
            repo.open_area(".layers") as area:
        area.make_temp_dir("x")
    assert not (tmp_path / "r.cern.ch" / ".layers").exists(), "not even a folder is made"


def test_abort_restores_and_publish_records(tmp_path):
    root = tmp_path / "r.cern.ch"
    root.mkdir()
    seed(root)
    before = snapshot(root)
    assert run(root, "abort-later").returncode == 0
    assert snapshot(root) != before
    pub = LocalPublisher("r.cern.ch", root)
    assert pub.is_open()
    pub.abort()
    assert snapshot(root) == before and not pub.is_open()
    assert run(root, "publish").returncode == 0
    after = snapshot(root)
    assert after["img:new"] == after["img:old"] == "-> .flat/" + "b" * 64
    assert after[".flat/" + "a" * 64 + "/f"] == "rebuilt flat"
    assert not any(k.startswith(".layers/" + "c" * 64) for k in after)
    assert not any(k.startswith("lib") for k in after), "emptied folders pruned"
    state = json.loads((root / ".unpacked/published.json").read_text())
    assert state["revision"] == 1 and state["message"] == "scripted"
    assert not os.listdir(root / ".unpacked/backup"), "backups dropped after the record"


def _steps(tmp_path: Path, action: str) -> int:
    root = tmp_path / "count"
    root.mkdir()
    seed(root)
    log = tmp_path / "count.log"
    assert run(root, action, crash=10**6, log=log).returncode == 0
    return len(log.read_text().splitlines())


@pytest.mark.parametrize("action", ["publish", "abort-later"])
def test_sigkill_at_every_step_then_recovery_killed_at_every_step(tmp_path, action):
    reference = tmp_path / "reference"
    reference.mkdir()
    seed(reference)
    before = snapshot(reference)
    assert run(reference, "publish").returncode == 0
    published = snapshot(reference)
    steps = _steps(tmp_path, action)
    assert steps >= 8
    for step in range(1, steps + 1):
        root = tmp_path / f"{action}-{step}"
        root.mkdir()
        seed(root)
        log = tmp_path / f"{action}-{step}.log"
        done = run(root, action, crash=step, log=log)
        assert done.returncode == -9, (step, done.stderr)
        label = log.read_text().splitlines()[-1]
        assert broken_links(root) == [], f"a public link names a missing flat image at {label}"
        recorded = (root / ".unpacked/published.json").exists()
        # the recovery is itself killed at each of its steps, then replayed
        for again in range(1, 40):
            done = run(root, "recover", crash=again, log=tmp_path / "recover.log")
            assert broken_links(root) == [], f"broken link recovering after {label}"
            if done.returncode == 0:
                break
        assert run(root, "recover").returncode == 0
        expected = published if recorded else before
        assert snapshot(root) == expected, f"killed at {label}"
        assert not (root / ".unpacked/journal").exists()
