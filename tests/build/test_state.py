"""The resolved-state cache, and its read-only view for a reader of cache/ (diskcache's table
layout, pinned here to the diskcache versions pyproject allows)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import diskcache

from unpacked.build.state import ReadOnlyCache, State

PROJECT = Path(__file__).resolve().parents[2]


def test_diskcache_is_in_the_pinned_range():
    low, high = re.search(r'"diskcache>=([\d.]+),<([\d.]+)"',
                          (PROJECT / "pyproject.toml").read_text()).groups()
    version = tuple(int(x) for x in diskcache.__version__.split(".")[:2])
    assert tuple(map(int, low.split(".")))[:2] <= version < tuple(map(int, high.split(".")))


def test_the_read_only_view_reads_what_diskcache_wrote(tmp_path):
    cache = diskcache.Cache(str(tmp_path / "c"))
    cache.set("small", {"a": [1, 2]})
    cache.set("large", "x" * 200_000)          # stored in a file beside the database
    cache.set("gone", "soon", expire=0.01)
    cache.set(("tuple", 1), b"raw bytes")
    cache.close()
    time.sleep(0.05)
    view = ReadOnlyCache(tmp_path / "c")
    assert view.get("small") == {"a": [1, 2]}
    assert view.get("large") == "x" * 200_000
    assert view.get("gone") is None, "expired values are absent"
    assert view.get(("tuple", 1)) == b"raw bytes"
    assert view.get("absent", "default") == "default"
    assert "small" in view and "absent" not in view


def test_a_cache_entry_that_does_not_load_is_absent(tmp_path):
    state = State(tmp_path)
    state.cache.set(state._key("resolved", "r/x:1"), {"name": "r/x:1", "images": "garbage"})
    state.cache.set(state._key("tags", "r/x:*"), "not a list")
    assert state.resolved("r/x:1") is None and state.tags("r/x:*") is None


def _in_worker(ctx, out) -> None:
    """In a forked worker: read what the parent read, write something of its own."""
    out.put((ctx.state.tags("reg/a"), ctx.state.tags("reg/b")))
    ctx.state.put_tags("reg/c", ["3"])
    ctx.state.close()


def test_a_forked_worker_keeps_what_its_parent_read_and_writes_through_its_own_handle(
        tmp_path):
    import multiprocessing

    from unpacked.build.context import Context
    from unpacked.settings import load
    ctx = Context(load({"cache": str(tmp_path / "cache")}, environ={}, project=tmp_path))
    ctx.state.put_tags("reg/a", ["1"])
    assert ctx.state.tags("reg/a") == ["1"]          # the parent has read the cache whole
    # written behind the parent's back: a worker answers from what its parent read, as
    # the parent does (the state is fixed for a run), without reading the cache again
    other = State(tmp_path / "cache")
    other.put_tags("reg/b", ["2"])
    other.close()
    fork = multiprocessing.get_context("fork")
    out = fork.Queue()
    worker = fork.Process(target=_in_worker, args=(ctx, out))
    worker.start()
    assert out.get(timeout=30) == (["1"], None)
    worker.join(30)
    assert worker.exitcode == 0
    again = State(tmp_path / "cache")
    assert again.tags("reg/c") == ["3"], "the worker's write reached the cache"
    assert again.tags("reg/b") == ["2"] and again.tags("reg/a") == ["1"]
