"""Recipe files: the seed's format, strict validation with file:line:key errors."""

from pathlib import Path

import pytest

from unpacked import recipe
from unpacked.errors import RecipeError

GOOD = """\
version: 1
user: smosciat
cvmfs_repo: unpacked.cern.ch
output_format: '$(scheme)://registry.gitlab.cern.ch/thin/$(image)'
input:
  - 'https://registry.hub.docker.com/library/fedora:latest'
  - 'https://registry.hub.docker.com/library/debian:stable'
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_recipe(tmp_path):
    [r] = recipe.load(write(tmp_path, GOOD))
    assert r.version == 1 and r.user == "smosciat" and r.cvmfs_repo == "unpacked.cern.ch"
    assert [i.line for i in r.inputs] == [6, 7]
    fedora = r.inputs[0].ref
    assert r.public_path_of(fedora) == "registry.hub.docker.com/library/fedora:latest"
    assert r.output_of(fedora) == "https://registry.gitlab.cern.ch/thin/library/fedora:latest"


def test_public_path_key_gives_seed_layout(tmp_path):
    text = GOOD + "public_path: '.singularity/$(registry)/$(repository)/$(tag)'\n"
    [r] = recipe.load(write(tmp_path, text))
    assert r.public_path_of(r.inputs[1].ref) == \
        ".singularity/registry.hub.docker.com/library/debian/stable"


def test_default_recipe_of_the_project_is_valid():
    [r] = recipe.load(Path(__file__).parents[2] / "recipes")
    assert [i.ref.repository for i in r.inputs] == ["library/fedora", "library/debian"]
    assert r.output_format is None


def swap(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD = [
    ("misspelt key", swap("cvmfs_repo:", "cvmfs_rpo:"), 3, "cvmfs_rpo: unknown key (did you "
     "mean 'cvmfs_repo'?)"),
    ("unknown key", GOOD + "colour: red\n", 8, "colour: unknown key"),
    ("missing key", swap("cvmfs_repo: unpacked.cern.ch\n", ""), 1, "cvmfs_repo: missing key"),
    ("wrong version", swap("version: 1", "version: 2"), 1, "version: must be 1, got 2"),
    ("version as string", swap("version: 1", "version: '1'"), 1, "version: must be 1"),
    ("user as list", swap("user: smosciat", "user: [a, b]"), 2, "user: must be a single value"),
    ("repo with slash", swap("unpacked.cern.ch", "a/b"), 3, "cvmfs_repo: must be a repository"),
    ("input not list", swap("input:\n  - 'https://registry.hub.docker.com/library/fedora:latest'"
                            "\n  - 'https://registry.hub.docker.com/library/debian:stable'\n",
                            "input: fedora\n"), 5, "input: must be a list"),
    ("empty input", swap("input:\n  - 'https://registry.hub.docker.com/library/fedora:latest'"
                         "\n  - 'https://registry.hub.docker.com/library/debian:stable'\n",
                         "input: []\n"), 5, "input: is empty"),
    ("duplicated input", swap("library/debian:stable", "library/fedora:latest"), 7,
     "duplicates line 6"),
    ("duplicate after normalisation", swap("'https://registry.hub.docker.com/library/debian:"
                                           "stable'", "'registry.hub.docker.com/fedora'"), 7,
     "duplicates line 6"),
    ("bad reference", swap("library/debian:stable", "library/Debian:stable"), 7,
     "input: 'https://registry.hub.docker.com/library/Debian:stable': invalid repository"),
    ("input entry not string", swap("  - 'https://registry.hub.docker.com/library/debian:stable'",
                                    "  - {a: 1}"), 7, "input: each entry must be"),
    ("unknown placeholder", swap("$(image)", "$(imag)"), 4,
     "output_format: unknown placeholder $(imag)"),
    ("duplicated key", GOOD + "user: other\n", 8, "user: duplicated key (first at line 2)"),
    ("public path escapes", GOOD + "public_path: '../$(image)'\n", 8,
     "public_path: gives '../library/fedora:latest'"),
    ("public path reserved", GOOD + "public_path: '.layers/$(image)'\n", 8, "is reserved"),
    ("output without user", swap("user: smosciat\n", ""), 3, "user: missing key"),
    ("yaml syntax", swap("version: 1", "version: [1"), 2, "invalid YAML"),
    ("not a mapping", "- a\n- b\n", 1, "a recipe is a mapping"),
    ("empty file", "", 1, "the recipe is empty"),
    ("impossible date", swap("user: smosciat", "user: 2024-02-30"), 2, "user: must be"),
    ("tagged nonsense", swap("version: 1", "version: !!int one"), 1, "version: must be 1"),
    ("huge number", swap("version: 1", "version: " + "9" * 5000), 1, "version: must be 1"),
]


@pytest.mark.parametrize("label, text, line, message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_give_one_line_each(tmp_path, label, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as exc:
        recipe.load(path)
    lines = exc.value.lines
    assert any(x.startswith(f"{path}:{line}: ") and message in x for x in lines), lines
    assert all("\n" not in x for x in lines)


def test_folder_is_read_whole_and_clashes_found(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("library/debian:stable", "library/centos:7"), "b.yml")
    (tmp_path / "notes.txt").write_text("not a recipe")
    with pytest.raises(RecipeError) as exc:
        recipe.load(tmp_path)
    assert any("b.yml:6" in x and "same public path as" in x for x in exc.value.lines)
    write(tmp_path, GOOD.replace("unpacked.cern.ch", "other.cern.ch"), "b.yml")
    assert len(recipe.load(tmp_path)) == 2


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe"):
        recipe.load(tmp_path / "nope.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecipeError, match="no \\*.yaml recipe"):
        recipe.load(empty)


def test_output_format_must_give_a_reference(tmp_path):
    text = swap("'$(scheme)://registry.gitlab.cern.ch/thin/$(image)'", "'$(scheme)://$(digest)'")
    with pytest.raises(RecipeError) as exc:
        recipe.load(write(tmp_path, text))
    assert any(x.startswith(f"{tmp_path / 'r.yaml'}:4: output_format: gives 'https://'")
               for x in exc.value.lines)
