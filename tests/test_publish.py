"""The local publisher keeps CVMFS's transaction semantics on a plain folder."""

import json

import pytest

from unpacked.repo.fs import temp_sibling
from unpacked.repo.publish import LocalPublisher, TransactionError


def place(repo, rel: str, text: str):
    final = repo.root / rel
    temp = temp_sibling(final)
    (temp / "f").write_text(text)
    repo.place_dir(temp, final)


def test_writes_need_a_transaction(tmp_path):
    pub = LocalPublisher("r.cern.ch", tmp_path / "r.cern.ch", tmp_path / "cache")
    with pytest.raises(TransactionError, match="outside a transaction"):
        place(pub.repository(), ".layers/a", "x")


def test_abort_restores_and_publish_records(tmp_path):
    pub = LocalPublisher("r.cern.ch", tmp_path / "r.cern.ch", tmp_path / "cache")
    pub.begin()
    place(pub.repository(), ".layers/a", "old")
    pub.publish("first")
    assert json.loads((pub.meta / "published.json").read_text())["revision"] == 1
    pub.begin()
    repo = pub.repository()
    place(repo, ".layers/a", "new")
    place(repo, ".layers/b", "added")
    pub.abort()
    assert (tmp_path / "r.cern.ch/.layers/a/f").read_text() == "old"
    assert not (tmp_path / "r.cern.ch/.layers/b").exists()
    pub.begin()
    place(pub.repository(), ".layers/a", "newer")
    pub.publish("second")
    assert (tmp_path / "r.cern.ch/.layers/a/f").read_text() == "newer"
    state = json.loads((pub.meta / "published.json").read_text())
    assert state["revision"] == 2 and state["message"] == "second"
    assert not any(pub.backups.iterdir())


def test_crash_with_lost_cache_is_still_recovered(tmp_path):
    pub = LocalPublisher("r.cern.ch", tmp_path / "r.cern.ch", tmp_path / "cache")
    pub.begin()
    place(pub.repository(), ".layers/a", "half a run")
    pub.marker.unlink()                        # cache/ lost after a crash
    again = LocalPublisher("r.cern.ch", tmp_path / "r.cern.ch", tmp_path / "cache")
    assert again.recover() is True
    assert not (tmp_path / "r.cern.ch/.layers/a").exists()
    assert not again.is_open()
