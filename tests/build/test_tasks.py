"""Tasks made ahead, while the resolve waits (``Tasks.prepare``), and when that is wasted."""

from __future__ import annotations

from unpacked.build.context import Context
from unpacked.build.tasks import KINDS, Tasks
from unpacked.recipe import RecipeSet
from unpacked.settings import load


def _names(namespace: dict) -> list[str]:
    """Each generator's tasks by name (a row doit makes a task of names it in a dict)."""
    return [f"{kind}:{task['name'] if isinstance(task, dict) else task.name}"
            for kind, creator in namespace.items() for task in creator()]


def test_a_bare_runs_tasks_are_made_ahead_unless_the_state_moved(tmp_path):
    settings = load({"cache": str(tmp_path / "cache"), "root": str(tmp_path / "cvmfs"),
                     "recipes": str(tmp_path / "r")}, environ={}, project=tmp_path)
    ctx = Context(settings, RecipeSet([], [], []))
    made_now = Tasks(ctx, due_only=True).namespace()    # made when doit asks
    ahead = Tasks(ctx, due_only=True)
    ahead.prepare()
    prepared = ahead.namespace()
    assert list(prepared) == [f"task_{kind}" for kind in KINDS]
    assert all(getattr(creator, "__self__", None) is None for creator in prepared.values()), \
        "what prepare made is handed over, not made again"
    assert _names(prepared) == _names(made_now) and "task_publish:None" in _names(prepared)
    assert [c.__doc__ for c in prepared.values()] == [c.__doc__ for c in made_now.values()]

    looks = []

    def stale() -> bool:         # the resolve wrote the state after the second kind
        looks.append(1)
        return len(looks) > 2
    late = Tasks(ctx, due_only=True)
    late.prepare(stale)
    namespace = late.namespace()
    assert len(looks) == 3, "no further kind is made once the state moved"
    assert all(getattr(c, "__self__", None) is late for c in namespace.values()), \
        "nothing half made is handed over: doit makes them all from the new state"
    assert _names(namespace) == _names(made_now)
