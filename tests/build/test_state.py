"""The resolved-state cache, and its read-only view for a reader of cache/ (diskcache's table
layout, pinned here to the diskcache versions pyproject allows)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import diskcache
import pytest

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


def test_a_worker_reads_and_writes_the_cache_key_by_key(tmp_path):
    whole = State(tmp_path)
    whole.put_tags("reg/a", ["1"])
    assert whole.tags("reg/a") == ["1"]             # read whole, now answered from memory
    single = State(tmp_path, whole=False)
    single.put_tags("reg/b", ["2"])
    single.put_failure("reg/c", "boom", gone=True)
    assert single.tags("reg/a") == ["1"] and single.failure("reg/c") == "boom"
    assert single._memo is None, "a worker never holds every entry"
    single.put_resolved(_resolved("reg/d:1", "sha256:" + "d" * 64))
    assert single.resolved("reg/d:1") == _resolved("reg/d:1", "sha256:" + "d" * 64)
    assert not single._parsed, "nor keeps what it parsed"
    single.put_failure("reg/c", None)
    assert single.failure("reg/c") is None and not single.gone("reg/c")
    # the whole reader answers from what it read; a fresh one sees the worker's writes
    assert whole.tags("reg/b") is None
    again = State(tmp_path)
    assert again.tags("reg/b") == ["2"] and again.failure("reg/c") is None
    # the run's own writes after the worker's first read (its resolve) reach the worker
    again.put_resolved(_resolved("reg/e:1", "sha256:" + "e" * 64))
    assert single.resolved("reg/e:1") == _resolved("reg/e:1", "sha256:" + "e" * 64)
    assert isinstance(single._reader, ReadOnlyCache), "read on a plain connection"
    seen = []                       # ... which answers any thread of the worker
    reader = threading.Thread(target=lambda: seen.append(single.resolved("reg/e:1")))
    reader.start()
    reader.join()
    assert seen == [_resolved("reg/e:1", "sha256:" + "e" * 64)]


def _resolved(name: str, digest: str):
    from unpacked.registry.resolved import Layer, PlatformImage, Resolved
    layer = Layer("sha256:" + "1" * 64, 10, "application/vnd.oci.image.layer.v1.tar+gzip",
                  "sha256:" + "2" * 64)
    image = PlatformImage("linux/amd64", digest, "application/vnd.oci.image.manifest.v1+json",
                          b'{"m": 1}', "sha256:" + "3" * 64, b'{"c": 1}', [layer])
    return Resolved(name, digest, image.media_type, ("linux/amd64",), [image])


def test_a_parsed_entry_is_kept_once_and_only_a_change_is_written(tmp_path):
    first = _resolved("reg/a:1", "sha256:" + "a" * 64)
    State(tmp_path).put_resolved(first)
    state = State(tmp_path)
    known = state.resolved("reg/a:1")
    assert known == first.light() and state.resolved("reg/a:1") is known
    assert [(i.manifest, i.config) for i in known.images] == [(None, None)], \
        "the run keeps no document bytes"
    assert state._key("resolved", "reg/a:1") not in state._memo, "the raw copy is dropped"
    whole = state.resolved("reg/a:1", with_bytes=True)
    assert whole == first, "the bytes are read from the cache when asked for"
    assert state.resolved("reg/a:1") is known, "... and not kept"
    with pytest.raises(ValueError, match="light"):
        known.to_dict()                             # never stored without its bytes
    writable, state.cache = state.cache, ReadOnlyCache(state.folder)  # no set(): a write fails
    state.put_resolved(_resolved("reg/a:1", "sha256:" + "a" * 64))   # equal: not written
    state.put_failure("reg/a:1", None)                               # none to delete
    state.cache = writable
    assert state.writes == 0, "what a run prepared from the state stays good"
    moved = _resolved("reg/a:1", "sha256:" + "b" * 64)
    state.put_resolved(moved)
    assert state.writes == 1, "a change is counted: a run prepares again"
    state.put_failure("reg/a:1", "refused")
    state.put_failure("reg/a:1", None)
    assert state.writes == 3
    assert state.resolved("reg/a:1") == moved.light()
    assert state.resolved("reg/a:1", with_bytes=True) == moved
    assert state._key("resolved", "reg/a:1") not in state._memo, "nor is what was written kept"
    assert State(tmp_path).resolved("reg/a:1", with_bytes=True) == moved, \
        "a change reaches the cache"
    fresh = State(tmp_path)
    fresh.put_resolved(first)                           # as a cold run's resolve does
    assert fresh._key("resolved", "reg/a:1") not in fresh._memo
    assert State(tmp_path).resolved("reg/a:1", with_bytes=True) == first


def test_two_threads_asking_for_one_entry_both_get_it(tmp_path):
    """The run plans while the resolve's threads read the same entries: a reader that finds
    the entry neither parsed nor raw (another thread just parsed it) still gets it."""
    names = [f"reg/a:{i}" for i in range(300)]
    writer = State(tmp_path)
    for name in names:
        writer.put_resolved(_resolved(name, "sha256:" + "a" * 64))
    for _ in range(5):
        state, missing = State(tmp_path), []

        def ask(order, state=state, missing=missing):
            missing += [name for name in order if state.resolved(name) is None]

        threads = [threading.Thread(target=ask, args=(names[::step],))
                   for step in (1, -1, 1, -1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert missing == []


def test_a_reader_never_puts_back_what_a_resolve_replaced(tmp_path):
    """The plan reads an entry while a resolve thread writes a newer one: the reader read the
    old raw entry, the thread wrote and kept the new one, then the reader keeps what it
    parsed. The new one stays, in memory as on disk."""
    from unpacked.registry.resolved import Resolved
    old, new = (_resolved("reg/a:1", "sha256:" + c * 64) for c in "ab")
    State(tmp_path).put_resolved(old)
    state = State(tmp_path)
    key = state._key("resolved", "reg/a:1")
    raw = state._get(key)                       # the reader's read ...
    state.put_resolved(new)                     # ... a thread's write ...
    kept = state._keep_parsed(key, Resolved.from_dict(raw), replace=False)   # ... its keep
    assert kept == new.light() and state.resolved("reg/a:1") == new.light()
    assert State(tmp_path).resolved("reg/a:1") == new.light()


def test_digests_and_media_types_are_held_once_however_many_images_name_them():
    import json

    from unpacked.registry.resolved import Resolved
    one = _resolved("reg/a:1", "sha256:" + "a" * 64)
    # strings made anew, as each manifest's parse or each cache read makes them
    again = [Resolved.from_dict(json.loads(json.dumps(one.to_dict()))) for _ in range(2)]
    for x, y in ((one, again[0]), (again[0], again[1])):
        assert x.images[0].layers[0].digest is y.images[0].layers[0].digest
        assert x.images[0].layers[0].diff_id is y.images[0].layers[0].diff_id
        assert x.images[0].layers[0].media_type is y.images[0].layers[0].media_type
        assert x.images[0].platform is y.images[0].platform
        assert x.images[0].config_digest is y.images[0].config_digest
