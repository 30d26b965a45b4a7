"""doit's private internals that unpacked relies on, pinned to the versions pyproject allows.

If a doit release changes how it stores saved values or command-line variables, these fail
loudly (and the allowed range in pyproject must not be widened before they pass again).
"""

from __future__ import annotations

import json
import pickle
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import doit
import pytest

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
    # from the rows as the run read them: the same rows go, the table is not read again
    snapshot = doit_private.recorded_values(db)
    assert doit_private.prune(db, keep | {"b"}, owner="mine", recorded=snapshot) == 0
    assert doit_private.prune(db, keep, owner="another set", recorded=snapshot) == 0
    assert set(doit_private.recorded_values(db)) == {"a", "b", "seen"}
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(db.read_bytes())
    assert doit_private.prune(copy, keep, owner="mine", recorded=snapshot) == 1
    assert set(doit_private.recorded_values(copy)) == keep
    assert doit_private.prune(db, keep, owner="another set",
                              recorded=doit_private.recorded_values(db)) == 0, \
        "another set's rows stay"
    assert set(doit_private.recorded_values(db)) == {"a", "b", "seen"}
    assert doit_private.prune(db, keep, owner="mine",
                              recorded=doit_private.recorded_values(db)) == 1
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
        assert ours[name].calc_dep is doit_private._NO_CALC     # one set: nothing adds to it
        assert ours[name].getargs is doit_private._NO_ARGS      # one dict: doit only reads it
        assert ours[name].creator_params is doit_private._NO_PARAMS
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


# -- a lean run: doit keeps nothing of a task once it is done ---------------------------------

def _step(log: str, name: str, ok: bool = True):
    """An action: note its task ran, then succeed (with values) or fail."""
    with open(log, "a") as out:
        out.write(name + "\n")
    return {"digest": name, "set": "mine"} if ok else False


def _graph(log: str):
    """A run's shape in small: a transaction as the setup task of what is due, layers, a
    failing layer and everything above it, an up-to-date task, a publish at the top."""
    def row(kind, name, deps=(), ok=True, due=True):
        return {"name": name, "actions": [(_step, [log, f"{kind}:{name}", ok])],
                "task_dep": list(deps), "uptodate": [not due],
                "setup": ["txn"] if due else [], "meta": {"images": []}}

    def task_txn():
        yield doit_private.task("txn", {"actions": [(_step, [log, "txn"])], "uptodate": [False]})

    def task_layer():
        yield from doit_private.tasks_of("layer", {"doc": "layers"}, [
            row("layer", "a"), row("layer", "b"), row("layer", "bad", ok=False),
            row("layer", "old", due=False)])

    def task_flat():
        yield from doit_private.tasks_of("flat", {"doc": "flats"}, [
            row("flat", "x", ["layer:a", "layer:b", "layer:old"]),
            row("flat", "y", ["layer:a", "layer:bad"])])

    def task_image():
        yield from doit_private.tasks_of("image", {"doc": "images"}, [
            row("image", "x", ["flat:x"]), row("image", "y", ["flat:y"]),
            row("image", "same", ["layer:old"], due=False)])

    def task_publish():
        yield doit_private.task("publish", {
            "actions": [(_step, [log, "publish"])], "uptodate": [False],
            "task_dep": ["image:x", "image:y", "image:same"]})

    return {"task_txn": task_txn, "task_layer": task_layer, "task_flat": task_flat,
            "task_image": task_image, "task_publish": task_publish}


class _Seen:
    """A reporter that notes how each task ended."""

    def __init__(self):
        self.ended: dict[str, str] = {}

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def add_success(self, task):
        self.ended[task.name] = "success"

    def add_failure(self, task, fail):
        self.ended[task.name] = type(fail).__name__

    def skip_uptodate(self, task):
        self.ended[task.name] = "up-to-date"


def _run_graph(tmp_path, label: str, jobs: int, graph: dict):
    """Run ``graph``'s publish with doit's threads (``jobs``), going on after failures:
    (exit code, how each task ended)."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain
    seen = _Seen()
    config = {"backend": "sqlite3", "dep_file": str(tmp_path / f"{label}.sqlite"),
              "num_process": jobs, "par_type": "thread", "continue": True, "reporter": seen,
              "default_tasks": ["publish"]}
    code = DoitMain(ModuleTaskLoader({"DOIT_CONFIG": config, **graph}),
                    config_filenames=()).run([])
    return code, seen.ended


def _run(tmp_path, label: str, jobs: int):
    log = tmp_path / f"{label}.log"
    code, ended = _run_graph(tmp_path, label, jobs, _graph(str(log)))
    with sqlite3.connect(tmp_path / f"{label}.sqlite") as db:
        rows = {name: json.loads(data) for name, data in db.execute("select * from doit")}
    return code, ended, log.read_text().split(), rows


@pytest.fixture
def lean_run(monkeypatch):
    """``doit_private.lean_run`` for this test only: doit's own classes back afterwards."""
    import doit.control
    from doit.dependency import Dependency
    monkeypatch.setattr(doit.control, "TaskDispatcher", doit.control.TaskDispatcher)
    monkeypatch.setattr(Dependency, "save_success", Dependency.save_success)
    return doit_private.lean_run


@pytest.mark.parametrize("jobs", [0, 2])
def test_a_lean_run_runs_what_doits_own_run_does_and_keeps_nothing_done(tmp_path, monkeypatch,
                                                                      lean_run, jobs):
    import doit.control
    from doit.dependency import Dependency
    made: list = []

    class Watched(doit_private.LeanDispatcher):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    code, ended, ran, rows = _run(tmp_path, "doit", jobs)
    lean_run()
    assert doit.control.TaskDispatcher is doit_private.LeanDispatcher
    doit_private.lean_run()             # twice: still one wrapper
    assert not getattr(Dependency.save_success.__closure__[0].cell_contents, "lean", False)
    monkeypatch.setattr(doit.control, "TaskDispatcher", Watched)
    lean = _run(tmp_path, "lean", jobs)

    assert code == 2 and ended["flat:y"] == "UnmetDependency" and ended["layer:bad"] \
        == "TaskFailed" and ended["layer:old"] == "up-to-date" and ran.count("txn") == 1
    assert lean[:2] == (code, ended)
    assert sorted(lean[2]) == sorted(ran)   # doit's own order follows its sets' (by id)
    before = {"txn": [], "layer:a": ["txn"], "layer:b": ["txn"], "flat:x": ["layer:a", "layer:b"],
              "image:x": ["flat:x"]}
    for name, deps in before.items():       # and never before what it waits for
        assert all(lean[2].index(dep) < lean[2].index(name) for dep in deps), name
    # the same values recorded; doit's copy of them under result: is left out
    assert {n: r["_values_:"] for n, r in lean[3].items()} == \
        {n: r["_values_:"] for n, r in rows.items()}
    assert "result:" in rows["layer:a"] and "result:" not in lean[3]["layer:a"]
    # doit's own run and ours left the shared containers empty
    assert not doit_private._NO_CALC and not doit_private._NO_ARGS and not doit_private._NO_PARAMS
    # and nothing kept of a task done but its name, values and state
    (dispatcher,) = made
    assert set(dispatcher.nodes) == set(ended)
    for name, node in dispatcher.nodes.items():
        assert node.run_status in ("successful", "failure", "up-to-date"), name
        if node.run_status == "failure":    # doit names it in the errors of its dependents
            assert node.generator is None and node.waiting_me is doit_private._SPENT, name
            assert node.ancestors == () and node.bad_deps == () and not node.wait_run, name
        else:                               # its status alone: one shared object a status
            assert node is doit_private._ENDED[node.run_status], name
        task = dispatcher.tasks[name]
        assert task._action_instances is None and task.task_dep == () and task.meta is None
        assert pickle.loads(pickle.dumps(task)).name == name   # -P process sends tasks
        assert task.name == name
        if ended[name] == "success":
            assert task.values == {"digest": name, "set": "mine"}


def test_a_lean_node_starts_as_doits_own_does():
    """Attribute by attribute, with the one empty set for what only calc_dep fills."""
    from doit.control import ExecNode
    top = doit_private.task("top", {"task_dep": ["a", "b"], "uptodate": [False]})
    child = doit_private.task("a", {"uptodate": [False]})
    for task, parent in ((top, None), (child, ExecNode(top, None))):
        ours, theirs = doit_private.LeanNode(task, parent), ExecNode(task, parent)
        assert vars(ours).keys() == vars(theirs).keys()
        assert vars(ours) == vars(theirs)
        assert ours.calc_dep is doit_private._NO_CALC and ours.wait_run is not theirs.wait_run
    other = doit_private.LeanNode(child, None)
    assert other.wait_run is not ExecNode(child, None).wait_run and other.waiting_me == set()
    assert doit_private.LeanNode(child, None).wait_run is not other.wait_run
    calc = doit_private.task("c", {"uptodate": [False]})
    calc.calc_dep = {"x"}
    node = doit_private.LeanNode(calc, None)
    assert node.calc_dep == {"x"} and node.calc_dep is not calc.calc_dep
    assert node.wait_run_calc is not doit_private._NO_CALC


def _calc_found() -> dict:
    return {"task_dep": []}


def test_a_lean_run_of_a_task_loaded_late_with_calc_deps(tmp_path, lean_run):
    """A placeholder node (doit's ``create_after``) whose loaded task has calc deps gets sets
    of its own: the one shared empty set stays empty (else every node would wait on it)."""
    from doit import create_after
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain
    lean_run()
    log = str(tmp_path / "ran.log")

    def task_setup():
        return {"actions": [(_step, [log, "setup"])], "uptodate": [False]}

    def task_calc():
        return {"actions": [_calc_found], "uptodate": [False]}

    @create_after(executed="setup")
    def task_late():
        return {"actions": [(_step, [log, "late"])], "calc_dep": ["calc"], "uptodate": [False]}

    def task_other():
        for i in range(3):
            yield {"name": str(i), "actions": [(_step, [log, f"other:{i}"])],
                   "task_dep": ["setup"], "uptodate": [False]}

    config = {"backend": "sqlite3", "dep_file": str(tmp_path / "doit.sqlite"),
              "default_tasks": ["late", "other"]}
    code = DoitMain(ModuleTaskLoader({"DOIT_CONFIG": config, "task_setup": task_setup,
                                      "task_calc": task_calc, "task_late": task_late,
                                      "task_other": task_other}), config_filenames=()).run([])
    assert code == 0 and not doit_private._NO_CALC
    assert sorted(Path(log).read_text().split()) == ["late", "other:0", "other:1", "other:2",
                                                     "setup"]


def _wide_graph(log: str, images: int, base_seconds: float = 0) -> dict:
    """``images`` images of one layer of their own and one shared (``layer:base``, taking
    ``base_seconds``), all due, and the transaction every due task waits for."""
    def rows(kind, deps):
        return [{"name": str(i), "actions": [(_step, [log, f"{kind}:{i}"])],
                 "task_dep": deps(i), "uptodate": [False], "setup": ["txn"]}
                for i in range(images)]

    def task_txn():
        yield doit_private.task("txn", {"actions": [(_step, [log, "txn"])],
                                        "uptodate": [False]})

    def task_layer():
        yield from doit_private.tasks_of("layer", {}, [*rows("layer", lambda i: []), {
            "name": "base", "actions": [(_slowly, [log, base_seconds])], "uptodate": [False],
            "setup": ["txn"]}])

    def task_flat():
        yield from doit_private.tasks_of("flat", {}, rows("flat", lambda i: [
            f"layer:{i}", "layer:base"]))

    def task_image():
        yield from doit_private.tasks_of("image", {}, rows("image", lambda i: [f"flat:{i}"]))

    def task_publish():
        yield doit_private.task("publish", {"actions": [(_step, [log, "publish"])],
                                            "uptodate": [False],
                                            "task_dep": [f"image:{i}" for i in range(images)]})

    return {"task_txn": task_txn, "task_layer": task_layer, "task_flat": task_flat,
            "task_image": task_image, "task_publish": task_publish}


def _slowly(log: str, seconds: float) -> dict:
    """A shared layer that takes its time."""
    import time
    _step(log, "base")
    time.sleep(seconds)
    return _step(log, "base-end")


def test_a_lean_run_walks_only_so_far_ahead_while_its_transaction_opens(tmp_path, monkeypatch,
                                                                       lean_run):
    """Everything due waits for the transaction's setup task: doit's own walk made every node
    of the graph before it ran; the lean walk holds on after ``WALK_AHEAD`` waiting nodes, and
    then runs all of it as doit's own run does (threads), or never holds (serial)."""
    import doit.control
    images = 3 * doit_private.WALK_AHEAD
    total = 3 * images + 3
    log = tmp_path / "ran.log"
    graph = _wide_graph(str(log), images)
    at_txn_end: list[int] = []

    def watched(dispatcher):
        """``dispatcher``, noting how many nodes exist when the transaction is open."""
        class Watched(dispatcher):
            def _update_waiting(self, processed):
                if processed is not None and processed.task.name == "txn" and \
                        processed.run_status == "successful":
                    at_txn_end.append(len(self.nodes))
                super()._update_waiting(processed)
        return Watched

    monkeypatch.setattr(doit.control, "TaskDispatcher", watched(doit.control.TaskDispatcher))
    code, ended = _run_graph(tmp_path, "doit", 2, graph)
    assert code == 0 and len(ended) == total and at_txn_end == [total]   # doit's own walk
    lean_run()
    monkeypatch.setattr(doit.control, "TaskDispatcher", watched(doit_private.LeanDispatcher))
    for jobs in (2, 0):
        at_txn_end.clear()
        assert _run_graph(tmp_path, f"lean{jobs}", jobs, graph) == (code, ended), jobs
        (nodes,) = at_txn_end
        if jobs:    # the images (publish's deps, made at once) and the window's few
            assert images < nodes < images + 2 * doit_private.WALK_AHEAD
        else:       # serial: the transaction ran when first met, before anything waited
            assert images < nodes < images + 10
    assert log.read_text().split().count("txn") == 3


def test_a_lean_run_never_holds_free_workers_back_from_runnable_work(tmp_path, lean_run):
    """A slow layer every image shares, and more images waiting on it than ``WALK_AHEAD``:
    the other thread runs every image's own layer meanwhile, as doit's own walk would."""
    lean_run()
    images = doit_private.WALK_AHEAD
    log = tmp_path / "ran.log"
    code, ended = _run_graph(tmp_path, "lean", 2, _wide_graph(str(log), images, 3.0))
    assert code == 0 and len(ended) == 3 * images + 3
    ran = log.read_text().split()
    own = [n for n in ran[:ran.index("base-end")] if n.startswith("layer:")]
    assert len(own) == images, f"{len(own)} of {images} own layers ran beside the shared one"
