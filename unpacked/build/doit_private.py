"""Everything that leans on doit's private internals, in one small module.

doit keeps each task's saved values in its sqlite3 backend (table ``doit``, JSON under the
key ``_values_:``) and the ``name=value`` arguments of the command line in
``doit.doit_cmd._CMDLINE_VARS``. Neither is public API; a test pins both to the doit versions
pyproject allows, so an upgrade that changes them fails loudly instead of silently.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from sys import intern
from typing import NamedTuple

from doit.control import ExecNode, TaskDispatcher
from doit.dependency import Dependency
from doit.task import Task

VALUES = "_values_:"


def command_line_variables() -> dict[str, str]:
    """The ``name=value`` arguments doit was given (``doit root=/srv/x``)."""
    from doit import doit_cmd
    return dict(getattr(doit_cmd, "_CMDLINE_VARS", None) or {})


class Invocation(NamedTuple):
    """How doit was invoked, read with doit's own option tables (so ``-ac``, ``--always-ex``
    and every other spelling getopt accepts mean here what they mean to doit)."""
    command: str            # run, list, info, forget, ...; "help" for --help/--version
    options: dict           # doit's parsed option values of that command
    tasks: list[str]        # the task names given (``name=value`` variables left out)
    given: frozenset[str] = frozenset()     # the options given (not left at their default)


def invocation(argv: list[str]) -> Invocation:
    """Parse ``doit``'s command line as doit does; on an error doit will report, defaults."""
    from doit.cmd_base import DodoTaskLoader, DoitCmdBase
    from doit.cmdparse import CmdOption, CmdParse, CmdParseError
    from doit.doit_cmd import DoitMain
    args = list(argv[1:])
    if args and args[0] in ("--version", "--help", "-h"):
        return Invocation("help", {}, [])
    commands = {c.get_name(): c for c in DoitMain.DOIT_CMDS}
    name = args.pop(0) if args and args[0] in commands else "run"
    cls = commands[name]
    table = list(cls.cmd_options)
    if issubclass(cls, DoitCmdBase):
        table = [*DoitCmdBase.base_options, *DodoTaskLoader.cmd_options, *table]
    try:
        options, rest = CmdParse([CmdOption(o) for o in table]).parse(args)
    except CmdParseError:
        return Invocation(name, {}, [])
    return Invocation(name, dict(options), [a for a in rest if "=" not in a],
                      frozenset(getattr(options, "_non_default_keys", ())))


RECORDED = ("digest", "key", "manifest", "failed", "set")    # what the task states read


def recorded_values(path: Path) -> dict[str, dict]:
    """Tasks doit has recorded as done, with the saved values their states read
    (``RECORDED``; one read-only query). Only those: with ten thousand images, the whole
    values of every row took 44 MiB of a no-op run's heap (traced)."""
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    # a row that is not JSON is read as unrecorded, never an error for the whole query
    columns = ", ".join(f"case when json_valid(task_data) then json_extract(task_data, "
                        f"'$.\"{VALUES}\".{key}') end" for key in RECORDED)
    shared: dict = {}                       # one object per repeated value (the recipe set)
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            # cut out by SQLite: no JSON is parsed here
            for task_id, *values in db.execute(f"select task_id, {columns} from doit"):
                out[task_id] = {key: shared.setdefault(value, value) if key == "set" else value
                                for key, value in zip(RECORDED, values, strict=True)
                                if value is not None}
    except sqlite3.Error:
        return {}
    return out


def prune(path: Path, keep: set[str], owner: str, recorded: dict[str, dict]) -> int:
    """Delete doit's rows of tasks that no longer exist (doit never does): only rows this
    recipe set wrote (values ``set`` == ``owner``, or unmarked), never another set's.
    ``recorded``: the rows as this run read them (``recorded_values``); no other run can have
    written since (the cache's run lock), so the table is not read again, and a run with
    nothing stale does not open it (ten thousand images: 0.09 s at a no-op's end)."""
    stale = [task_id for task_id, values in recorded.items()
             if task_id not in keep and values.get("set") in (None, owner)]
    if not stale or not keep or not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        db.executemany("delete from doit where task_id = ?", [(n,) for n in stale])
    return len(stale)


# -- tasks made without doit's per-attribute checks -------------------------------------------

ROW_KEYS = {"name", "actions", "task_dep", "uptodate", "setup", "doc", "meta", "verbosity"}
# Every task's output goes straight to the run's streams: to capture it, doit swaps
# sys.stdout/sys.stderr around each action, which its thread runner does from several threads
# at once (a thread can restore another's capture; with ten thousand tasks a run ended with
# exit code 120, its streams broken at exit). Our actions log; they print nothing to capture.
NOT_CAPTURED = {"capture": False}
# What a task of ours never has, one shared empty container each: doit only reads these
# (it adds to them only for features our rows do not use: file deps, targets, wildcards,
# result_dep, clean and teardown actions). Beside those: calc_dep, a set: doit's node copies
# it and clears the copy; it adds to a task's own only from the results of its calc deps
# (ours have none), so one set serves every task; getargs, a dict, and creator_params, a
# list (``doit help`` adds it to a list), which doit only reads once a task is made (its
# loader replaces the list of a task it makes with parameters, never adds to one).
_NONE = {"file_dep": frozenset(), "wild_dep": (), "targets": (), "value_savers": (),
         "clean_actions": (), "teardown": ()}
_NO_CALC: set = set()
_NO_ARGS: dict = {}
_NO_PARAMS: list = []
_PROTO = dict(vars(Task("prototype", None, io=NOT_CAPTURED)), **_NONE)
_ATTRS = tuple(_PROTO)


def task_name(kind: str, key: str) -> str:
    """``kind:key`` as one string object however often it is named (a task's name, its
    state, and the deps of every task that waits for it: fifty thousand tasks a run at ten
    thousand images)."""
    return intern(f"{kind}:{key}")


class LeanTask(Task):
    """doit's ``Task`` with its attributes in slots, not a 34-key dict: a few hundred bytes
    a task instead of some two thousand, with ten thousand images' fifty thousand tasks.
    doit's few uses of ``__dict__`` (pickling for ``-P process``) read the slots here."""

    __slots__ = _ATTRS

    def _attrs(self) -> dict:
        return {name: getattr(self, name) for name in _ATTRS}

    def __getstate__(self) -> dict:
        return dict(self._attrs(), uptodate=None, value_savers=None, _action_instances=None)

    def __setstate__(self, state: dict) -> None:
        self.update_from_pickle(state)

    def pickle_safe_dict(self) -> dict:
        attrs = self._attrs()
        for name in ("_actions", "_action_instances", "clean_actions", "teardown",
                     "custom_title", "value_savers", "uptodate"):
            del attrs[name]
        return attrs

    def update_from_pickle(self, pickle_obj: dict) -> None:
        for name, value in pickle_obj.items():
            setattr(self, name, value)


_UPTODATE = {True: (True, None, None), False: (False, None, None)}


def _uptodate(items) -> list:
    """doit's own normal form of ``uptodate`` (``Task._init_uptodate``), its own list (``doit
    strace`` extends it); the common entries ``True`` and ``False`` shared."""
    return [_UPTODATE[item] if type(item) is bool else
            (item, None, None) if item is None else (item, [], {}) for item in items]


def _as_list(items) -> list:
    """A row's list as it is (one list is shared by the tasks of a repository set: doit
    only adds to a task's setup tasks for a ``result_dep`` no task of ours has), anything
    else as a new list."""
    return items if type(items) is list else list(items or ())


def task(name: str, row: dict, subtask_of: str | None = None, has_subtask: bool = False):
    """A doit ``Task`` equal to ``Task(name, io=NOT_CAPTURED, **row)`` (row keys:
    ``ROW_KEYS`` less ``name``), made in a sixth of the time and a third of the memory: tens
    of thousands of tasks are made per run, and doit's constructor checks the type of every
    attribute of each. Our rows are ours; a test pins the equality to doit's."""
    from doit.task import first_line
    unknown = set(row) - ROW_KEYS
    if unknown:
        raise ValueError(f"task {name}: unknown keys {sorted(unknown)}")
    made = LeanTask.__new__(LeanTask)
    attrs = dict(_PROTO)
    attrs.update(name=name, _actions=list(row.get("actions") or ()),
                 task_dep=list(row.get("task_dep", ())), setup_tasks=_as_list(row.get("setup")),
                 uptodate=_uptodate(row.get("uptodate", ())),
                 doc=first_line(row.get("doc")), meta=row.get("meta"),
                 verbosity=row.get("verbosity"), subtask_of=subtask_of, has_subtask=has_subtask,
                 values={}, getargs=_NO_ARGS, creator_params=_NO_PARAMS,
                 calc_dep=_NO_CALC)
    made.update_from_pickle(attrs)
    return made


def tasks_of(basename: str, group: dict, rows: list[dict]):
    """The group task ``basename`` and its subtasks ``basename:<row name>``, from the rows a
    generator would have yielded to doit (what doit's loader makes of them)."""
    subtasks = [task(task_name(basename, row["name"]), row, subtask_of=basename)
                for row in rows]
    yield task(basename, {"task_dep": [t.name for t in subtasks],
                          "uptodate": group.get("uptodate", ()), "doc": group.get("doc")},
               has_subtask=True)
    yield from subtasks


# -- a run's memory: what doit keeps of each task ---------------------------------------------
#
# doit keeps every task, its execution node (four sets, four lists, two generators) and its
# actions (their arguments and results) until the run ends, and its database's write-back
# cache holds each task's saved values twice (``_values_:``, and the same dict as
# ``result:``, for a ``result_dep`` no task of ours uses). Here a node is made only when the
# run is about to need it (``LeanDispatcher``), without the two sets only ``calc_dep`` fills
# (one shared empty set instead), and what a task done no longer needs is dropped as it ends:
# its node answers only ``run_status`` to the nodes made after it, the task keeps its name
# and values (the reporter reads them; the record saves them). Measured on a 3,000-image cold
# convert, main process: 141 MiB at the end with doit's nodes, 127 emptied as they end, 97
# made as the run goes; 10,000 images: 344 -> 261 MiB.

_SPENT = _NONE["file_dep"]     # the one empty frozenset (frozenset() makes a new one)
# all picklable (-P process sends it)
_SPENT_TASK = {"_actions": (), "_action_instances": None, "task_dep": (), "setup_tasks": (),
               "calc_dep": _SPENT, "uptodate": (), "meta": None, "creator_params": (),
               "options": None, "dep_changed": None, "result": None}


def spend(task: Task) -> None:
    """Drop what a done task no longer needs (above); its name and values stay."""
    if isinstance(task, LeanTask):
        task.update_from_pickle(_SPENT_TASK)


class LeanNode(ExecNode):
    """doit's ``ExecNode``, made without what our tasks never use and emptied as soon as
    doit is done with each part of it."""

    def __init__(self, task, parent):
        if task.calc_dep:               # a feature our tasks do not use: doit's own node
            super().__init__(task, parent)
            return
        self.task = task
        self.task_dep = task.task_dep   # only ever sliced, then replaced
        # doit only clears these, or adds the (no) results of calc_dep tasks: one empty set
        self.calc_dep = self.wait_run_calc = _NO_CALC
        self.ancestors = [*parent.ancestors, task.name] if parent else [task.name]
        self.wait_select = False
        self.wait_run, self.waiting_me = set(), set()
        self.run_status = None
        self.bad_deps, self.ignored_deps = [], []
        self.generator = None

    def reset_task(self, task, generator):
        """A task doit loaded late (``create_after``) replaces its placeholder: the node
        gets sets of its own, as doit's would (the loaded task may have calc deps)."""
        super().reset_task(task, generator)
        self.wait_run_calc = set()

    def step(self):
        got = super().step()
        if got is None:             # its generator is spent: the task was handed out
            self.generator = None
            self.ancestors = ()     # read only while its generator makes its deps' nodes
            self.task_dep, self.calc_dep = (), _SPENT
            self.wait_run = self.wait_run_calc = _SPENT
        return got

    def done(self) -> None:
        """Its task ran, failed, was up to date or ignored, and the nodes waiting for it were
        told: they never look at it again but for ``run_status``."""
        self.waiting_me = _SPENT
        self.bad_deps = self.ignored_deps = ()
        spend(self.task)


class Ended:
    """What stays of a task's node once it ran or was up to date: its status, all doit reads
    of it again (the nodes made after it ask whether it ran). A failed or ignored task keeps
    its node: doit names it in the error of each task that waited for it."""

    __slots__ = ("run_status",)

    def __init__(self, run_status: str):
        self.run_status = run_status

    def __repr__(self) -> str:
        return f"Ended({self.run_status})"


_ENDED = {status: Ended(status) for status in ("successful", "up-to-date")}
WALK_AHEAD = 256     # nodes left waiting before the walk waits for a setup task


class LeanDispatcher(TaskDispatcher):
    """doit's ``TaskDispatcher`` with ``LeanNode``s, walking the graph depth first, and not
    past a setup task everything waits for.

    doit walks breadth first, and on while every node it reaches waits: at a run's start
    everything due waits for the repository's ``_txn`` (a setup task), so it made every node
    of the graph before the first layer ran (a 10,000-image cold convert: 50,000 nodes at
    once, the run's peak). Here the node walked next is the one made last (the deps of the
    node just walked), so the walk stops at the first task it can hand out; and while a setup
    task is out with the runner and ``WALK_AHEAD`` nodes wait, it holds on until a task ends
    (doit's own "hold on", which its parallel runners wait out). Only then: a walk held while
    a slow shared layer runs would leave free workers idle beside runnable layers. A runner
    that runs each task as it gets it (doit's serial one) never has one out: it never holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setups = {name for task in self.tasks.values() for name in task.setup_tasks}

    def _setup_out(self) -> bool:
        """A setup task is with the runner: doit marks a node "run" as it hands it out, and
        its end state before it tells the dispatcher."""
        nodes = self.nodes
        return any(name in nodes and nodes[name].run_status == "run" for name in self._setups)

    def _get_next_node(self, ready, tasks_to_run):
        if self.waiting and len(self.waiting) >= WALK_AHEAD and self._setup_out():
            return None         # doit yields "hold on" (something waits: it never ends)
        if ready:
            return ready.pop()
        return super()._get_next_node(ready, tasks_to_run)

    def _gen_node(self, parent, task_name):
        if task_name not in self.nodes:
            node = self.nodes[task_name] = LeanNode(self.tasks[task_name], parent)
            node.generator = self._add_task(node)
            return node
        return super()._gen_node(parent, task_name)     # doit's check for cycles

    def _update_waiting(self, processed):
        super()._update_waiting(processed)
        if processed is not None and processed.run_status not in (None, "run"):
            processed.done()
            ended = _ENDED.get(processed.run_status)
            if ended is not None:
                self.nodes[processed.task.name] = ended


def _save_success(save):
    def save_success(self, task, result_hash=None):
        save(self, task, result_hash)
        record = getattr(self.backend, "_cache", {}).get(task.name) or {}
        if "result:" in record and record["result:"] == record.get("_values_:"):
            del record["result:"]
    save_success.lean = True
    return save_success


def lean_run() -> None:
    """Make doit's run keep nothing of a task once it is done (above); once per process."""
    import doit.control
    doit.control.TaskDispatcher = LeanDispatcher
    if not getattr(Dependency.save_success, "lean", False):
        Dependency.save_success = _save_success(Dependency.save_success)
