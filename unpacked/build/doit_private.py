"""Everything that leans on doit's private internals, in one small module.

doit keeps each task's saved values in its sqlite3 backend (table ``doit``, JSON under the
key ``_values_:``) and the ``name=value`` arguments of the command line in
``doit.doit_cmd._CMDLINE_VARS``. Neither is public API; a test pins both to the doit versions
pyproject allows, so an upgrade that changes them fails loudly instead of silently.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

VALUES = "_values_:"


def command_line_variables() -> dict[str, str]:
    """The ``name=value`` arguments doit was given (``doit root=/srv/x``)."""
    from doit import doit_cmd
    return dict(getattr(doit_cmd, "_CMDLINE_VARS", None) or {})


def recorded_values(path: Path) -> dict[str, dict]:
    """Tasks doit has recorded as done, with their saved values (one read-only query)."""
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            for task_id, data in db.execute("select task_id, task_data from doit"):
                try:
                    values = json.loads(data).get(VALUES)
                except (ValueError, AttributeError, TypeError):
                    values = None
                out[task_id] = values if isinstance(values, dict) else {}
    except sqlite3.Error:
        return {}
    return out


def prune(path: Path, keep: set[str], owner: str) -> int:
    """Delete doit's rows of tasks that no longer exist (doit never does): only rows this
    recipe set wrote (values ``set`` == ``owner``, or unmarked), never another set's."""
    if not path.exists() or not keep:
        return 0
    with sqlite3.connect(path) as db:
        stale = []
        for task_id, data in db.execute("select task_id, task_data from doit"):
            if task_id in keep:
                continue
            try:
                values = json.loads(data).get(VALUES) or {}
            except (ValueError, AttributeError, TypeError):
                values = {}
            if values.get("set") in (None, owner):
                stale.append(task_id)
        db.executemany("delete from doit where task_id = ?", [(n,) for n in stale])
    return len(stale)
