"""DUCC's notification file: processes appending at once never interleave their lines."""

from __future__ import annotations

import json
import multiprocessing

from unpacked.build import notify


def _writer(path: str, who: int, count: int) -> None:
    for i in range(count):          # lines far over PIPE_BUF: one write each, under a lock
        notify.emit(path, "end_layer_conversion", id=f"{who}-{i}", status="error",
                    error=str(who) * 20_000)


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "notifications.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(path), w, 200)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 800
    assert {x["id"] for x in lines} == {f"{w}-{i}" for w in range(4) for i in range(200)}
    assert all(x["error"] == x["id"].split("-")[0] * 20_000 for x in lines)
    assert all(x["action"] == "end_layer_conversion" and "time" in x for x in lines)


def test_a_file_that_cannot_be_written_is_not_a_failure(tmp_path):
    notify.emit(tmp_path / "missing" / "n.jsonl", "start_ducc")      # no folder: ignored
    with notify.step(None, "flat_conversion") as outcome:
        pass
    assert outcome == {"status": "ok"}
