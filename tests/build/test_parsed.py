"""Recipes parsed once and kept in cache/recipes/: used again only for the same file, the
same text and the same checks; a broken recipe is never kept, a broken cache never fatal."""

from __future__ import annotations

import pytest

from unpacked import recipe
from unpacked.build import parsed
from unpacked.errors import RecipeError

RECIPE = "version: 1\ncvmfs_repo: test.cern.ch\ninput:\n  - 'registry.example/a/b:{tag}'\n"


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = recipe.parse_recipe

    def parse(path, text):
        calls.append(path)
        return real(path, text)
    monkeypatch.setattr(recipe, "parse_recipe", parse)
    return calls


def read(path, cache):
    return recipe.read(path, parsed.parser(cache))


def test_a_recipe_is_parsed_once_while_its_text_stays(tmp_path, counted):
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1"))
    first = read(path, cache)
    assert cache.stat().st_mode & 0o777 == 0o700, "no one else may leave a pickle there"
    again = read(path, cache)
    assert counted == [path], "the second read took the kept parse"
    assert again.recipes == first.recipes and again.problems == []
    path.write_text(RECIPE.format(tag="v2"))
    changed = read(path, cache)
    assert len(counted) == 2
    assert [i.ref.tag for i in changed.recipes[0].inputs] == ["v2"]
    other = tmp_path / "s.yaml"
    other.write_text(RECIPE.format(tag="v2"))
    assert read(other, cache).recipes[0].path == other, "each file its own parse"
    assert len(counted) == 3


def test_new_checks_parse_again(tmp_path, counted, monkeypatch):
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1"))
    read(path, cache)
    monkeypatch.setattr(parsed, "_checks", lambda: b"the checks of another version")
    read(path, cache)
    assert len(counted) == 2


def test_a_broken_recipe_is_never_kept(tmp_path, counted):
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1").replace("cvmfs_repo", "cvmfs_rpo"))
    for _ in range(2):
        found = read(path, cache)
        assert found.recipes == [] and "r.yaml:2" in found.problems[0]
    assert len(counted) == 2 and not list(cache.glob("*"))
    with pytest.raises(RecipeError):
        recipe.load(path)


def test_a_kept_parse_that_cannot_be_read_is_parsed_again(tmp_path, counted):
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1"))
    read(path, cache)
    for junk in (b"not a pickle", b"", b"\x80\x05K\x01."):    # the last: a pickled 1
        for kept in cache.glob("*.pickle"):
            kept.write_bytes(junk)
        assert [i.ref.tag for i in read(path, cache).recipes[0].inputs] == ["v1"]
    assert len(counted) == 4


def test_a_reader_of_the_cache_uses_what_is_kept_and_writes_nothing(tmp_path, counted):
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1"))
    recipe.read(path, parsed.parser(cache, keep=False))
    assert not cache.exists()
    read(path, cache)
    recipe.read(path, parsed.parser(cache, keep=False))
    assert len(counted) == 2, "the reader took the parse kept by the run"


def test_a_kept_parse_is_loaded_only_from_a_folder_and_file_of_ours(tmp_path, counted):
    """Loading a pickle runs what it says: one in a folder others may write in, a link, or
    something that is not a regular file is never loaded (nor waited on)."""
    import os
    import pickle
    path, cache = tmp_path / "r.yaml", tmp_path / "cache"
    path.write_text(RECIPE.format(tag="v1"))
    read(path, cache)
    kept = next(cache.glob("*.pickle"))
    planted = tmp_path / "planted"

    class Planted:
        def __reduce__(self):
            return (open, (str(planted), "w"))
    evil = pickle.dumps(Planted())
    os.chmod(cache, 0o777)
    kept.write_bytes(evil)
    read(path, cache)
    assert not planted.exists() and cache.stat().st_mode & 0o777 == 0o700, \
        "not loaded from a folder anyone may write in; the folder made ours again"
    for make in ("link", "fifo"):
        for old in cache.glob("*.pickle"):
            old.unlink()
        if make == "link":
            (tmp_path / "elsewhere").write_bytes(evil)
            kept.symlink_to(tmp_path / "elsewhere")
        else:
            os.mkfifo(kept)
        assert [i.ref.tag for i in read(path, cache).recipes[0].inputs] == ["v1"]
        assert not planted.exists()


def test_an_inspection_keeps_nothing(tmp_path):
    """`doit list` and `doit info` write nothing in cache/recipes; a bare run keeps them."""
    from helpers.site import Site
    site = Site(tmp_path / "site")
    site.recipes.mkdir(parents=True, exist_ok=True)
    (site.recipes / "r.yaml").write_text(RECIPE.format(tag="v1"))
    for args in (["list"], ["list", "--all", "-s"], ["info", "image:registry.example/a/b:v1"]):
        done = site.doit(*args)
        assert done.returncode in (0, 1), done.stderr
        assert not (site.cache / "recipes").exists(), args
