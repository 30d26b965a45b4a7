"""doit's private internals that unpacked relies on, pinned to the versions pyproject allows.

If a doit release changes how it stores saved values or command-line variables, these fail
loudly (and the allowed range in pyproject must not be widened before they pass again).
"""

from __future__ import annotations

import pickle
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import doit

from unpacked.build import doit_private

PROJECT = Path(__file__).resolve().parents[2]

DODO = """
from unpacked.build import doit_private

SEEN = doit_private.command_line_variables()

def _save(value):
    return {"digest": value, "set": "mine", "bytes": 5}

def task_a():
    return {"actions": [(_save, ["x"])], "uptodate": [False]}

def task_b():
    return {"actions": [(_save, ["y"])], "uptodate": [False]}

def task_seen():
    return {"actions": [lambda: print(sorted(SEEN.items()))], "verbosity": 2,
            "uptodate": [False]}
"""


def _allowed_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    text = (PROJECT / "pyproject.toml").read_text()
    low, high = re.search(r'"doit>=([\d.]+),<([\d.]+)"', text).groups()
    return tuple(map(int, low.split("."))), tuple(map(int, high.split(".")))


def test_installed_doit_is_in_the_pinned_range():
    low, high = _allowed_range()
    assert low <= tuple(doit.__version__[:len(low)]) and tuple(doit.__version__) < high


def test_saved_values_command_line_variables_and_pruning(tmp_path):
    (tmp_path / "dodo.py").write_text(DODO)
    db = tmp_path / "doit.sqlite"
    common = ["--backend", "sqlite3", "--db-file", str(db)]
    done = subprocess.run([sys.executable, "-m", "doit", "run", *common, "a", "b", "seen",
                           "root=/srv/x", "platforms=all"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[('platforms', 'all'), ('root', '/srv/x')]" in done.stdout
    values = doit_private.recorded_values(db)
    # only the values task states read ("bytes" is not one)
    assert values["a"] == {"digest": "x", "set": "mine"} and values["b"]["digest"] == "y"
    with sqlite3.connect(db) as conn:         # one row that is not JSON spoils no other
        conn.execute("insert into doit values ('broken', 'not json {')")
    values = doit_private.recorded_values(db)
    assert values["broken"] == {} and values["a"] == {"digest": "x", "set": "mine"}
    with sqlite3.connect(db) as conn:
        conn.execute("delete from doit where task_id = 'broken'")
    keep = {"a", "seen"}
    assert doit_private.prune(db, keep, owner="another set") == 0, "another set's rows stay"
    assert set(doit_private.recorded_values(db)) == {"a", "b", "seen"}
    assert doit_private.prune(db, keep, owner="mine") == 1
    assert set(doit_private.recorded_values(db)) == keep


class _Check:
    def __call__(self, task, values):
        return True


ROWS = [
    {"name": "a", "actions": [(print, [1, 2])], "uptodate": [True], "setup": ["_txn:r"],
     "doc": "12,345 bytes, used by 3 images", "meta": {"images": ["x"]}, "verbosity": 2},
    {"name": "b", "actions": [(print, [])], "task_dep": ["layer:a", "flat:c"],
     "uptodate": [_Check()], "doc": "  first line\nsecond line"},
    {"name": "c", "actions": None, "uptodate": [False, None]},
]


def _comparable(task) -> dict:
    """Every attribute doit's Task has, with its type; the empty containers our tasks share
    (``_NONE``: tuples and a frozenset, which doit only reads) compare as doit's own."""
    from doit.task import Task
    attrs = {}
    for name in vars(Task("prototype", None)):
        value = getattr(task, name)
        if name in doit_private._NONE and value is not None:
            assert value == doit_private._NONE[name] or value == [] or value == set(), name
            value = "empty"
        attrs[name] = (type(value), value)
    attrs["io"] = vars(task.io)
    return attrs


def test_tasks_made_fast_equal_what_doits_loader_makes():
    """The fast path builds what doit's own constructor builds, attribute by attribute."""
    from doit.loader import generate_tasks

    def generator():
        yield {"name": None, "doc": "the group", "uptodate": [False],
               "io": doit_private.NOT_CAPTURED}
        for row in ROWS:
            yield dict(row, io=doit_private.NOT_CAPTURED)
    theirs = {t.name: t for t in generate_tasks("kind", generator(), "the group")}
    ours = {t.name: t for t in doit_private.tasks_of(
        "kind", {"name": None, "doc": "the group", "uptodate": [False]},
        [dict(r) for r in ROWS])}
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        assert _comparable(ours[name]) == _comparable(theirs[name]), name
        # and as doit's process runner sends it to a worker (-P process)
        sent = pickle.loads(pickle.dumps(ours[name]))
        assert _comparable(sent) == _comparable(theirs[name]) | {
            "uptodate": (type(None), None), "value_savers": (type(None), None),
            "_action_instances": (type(None), None)}, name
        assert sent.pickle_safe_dict().keys() == theirs[name].pickle_safe_dict().keys()
        # doit strace adds to a task's uptodate: one task's, never another's
        ours[name]._extend_uptodate([False])
        assert ours[name].uptodate[-1] == (False, None, None)
    assert [len(t.uptodate) for t in ours.values()] == [len(r.get("uptodate", ())) + 1
                                                       for r in [{"uptodate": [False]}, *ROWS]]


def test_the_command_line_is_read_as_doit_reads_it():
    from unpacked.build.dodo import jobs_of
    from unpacked.settings import load
    settings = load({}, environ={"UNPACKED_JOBS": "3"})
    call = doit_private.invocation(["doit", "-n", "4", "--always-execute", "image:x", "a=b"])
    assert call.command == "run" and call.tasks == ["image:x"]
    assert call.options["num_process"] == 4 and call.options["always"]
    assert {"num_process", "always"} <= call.given and "par_type" not in call.given
    assert jobs_of(call, settings) == 4, "-n wins over the setting"
    assert jobs_of(doit_private.invocation(["doit", "-n0"]), settings) == 0
    assert jobs_of(doit_private.invocation(["doit"]), settings) == 3
    one = load({}, environ={"UNPACKED_JOBS": "1"})
    assert jobs_of(doit_private.invocation(["doit"]), one) == 0, "1 job: no worker at all"
    listing = doit_private.invocation(["doit", "list", "--all"])
    assert listing.command == "list" and listing.options["subtasks"] and listing.tasks == []


def _nap(i: int) -> dict:
    import time
    time.sleep(0.002)
    return {"digest": str(i)}


def test_tasks_run_in_threads_leave_the_runs_streams_as_they_were(tmp_path):
    """doit swaps sys.stdout/err around each action it captures; from two threads at once a
    thread restores another's capture, and a long run's streams end nested thousands deep
    (exit code 120 at ten thousand images). Our tasks are not captured."""
    import sys

    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    def task_nap():
        yield from doit_private.tasks_of("nap", {"doc": "naps"}, [
            {"name": str(i), "actions": [(_nap, [i])], "uptodate": [False]}
            for i in range(60)])

    before = sys.stdout, sys.stderr
    config = {"backend": "sqlite3", "dep_file": str(tmp_path / "doit.sqlite"),
              "num_process": 2, "par_type": "thread", "verbosity": 2}
    code = DoitMain(ModuleTaskLoader({"DOIT_CONFIG": config, "task_nap": task_nap}),
                    config_filenames=()).run(["nap"])
    after = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = before
    assert code == 0
    assert after[0] is before[0] and after[1] is before[1]
    assert doit_private.recorded_values(tmp_path / "doit.sqlite")["nap:59"] == {"digest": "59"}
