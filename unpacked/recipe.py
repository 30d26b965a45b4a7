"""Recipe files (format v1 of the seed) -> validated Recipes; every error names file:line and key.

The YAML is composed into nodes (not constructed) so that each key and value keeps its line.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import reference
from .errors import BadReference, RecipeError
from .reference import ImageRef

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

DEFAULT_PUBLIC_PATH = "$(registry)/$(repository)$(reference)"
RESERVED = (".layers", ".flat", ".metadata", ".cvmfscatalog", ".cvmfsdirtab", ".unpacked")
KEYS = {
    "version": "must be 1",
    "user": "the account that pushes thin images",
    "cvmfs_repo": "the CVMFS repository written, e.g. unpacked.cern.ch",
    "output_format": "where thin images go, with $(...) placeholders (optional)",
    "public_path": "the public path inside the repository, with $(...) placeholders (optional)",
    "input": "the list of images to convert",
}
REQUIRED = ("version", "cvmfs_repo", "input")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Input:
    """One image of a recipe, with where it was written."""

    ref: ImageRef
    written: str
    line: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    version: int
    user: str | None
    cvmfs_repo: str
    output_format: str | None
    public_path: str
    inputs: tuple[Input, ...]

    def public_path_of(self, ref: ImageRef) -> str:
        return reference.format_template(self.public_path, ref)

    def output_of(self, ref: ImageRef) -> str | None:
        return reference.format_template(self.output_format, ref) if self.output_format else None


class _Collector:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def add(self, node: yaml.Node | None, key: str | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{self.path}:{line}"
        self.lines.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _scalar(node: yaml.Node) -> object:
    """Construct one scalar node with YAML's own typing (1 is int, 'a' is str, true is bool)."""
    return yaml.constructor.SafeConstructor().construct_object(node)


def _check_template(errors: _Collector, node: yaml.Node, key: str, value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        errors.add(node, key, f"must be a non-empty string, got {value!r}")
        return None
    for name in reference.placeholders_in(value):
        if name not in reference.PLACEHOLDERS:
            known = ", ".join(f"$({p})" for p in reference.PLACEHOLDERS)
            errors.add(node, key, f"unknown placeholder $({name}); known: {known}")
            return None
    return value


def _check_public_path(errors: _Collector, node: yaml.Node, template: str, ref: ImageRef) -> None:
    path = reference.format_template(template, ref)
    parts = path.split("/")
    if path.startswith("/") or ".." in parts or "" in parts or "." in parts:
        errors.add(node, "public_path", f"gives {path!r} for {ref}: not a clean relative path")
    elif parts[0] in RESERVED:
        errors.add(node, "public_path", f"gives {path!r}: {parts[0]} is reserved")


def _check_output(errors: _Collector, node: yaml.Node, template: str, ref: ImageRef) -> None:
    if ref.is_wildcard:
        ref = ref.with_tag("expanded")      # each expanded tag replaces the wildcard
    out = reference.format_template(template, ref)
    try:
        parsed = reference.parse(out)
    except BadReference as exc:
        errors.add(node, "output_format", f"gives {out!r} for {ref}: {exc}")
        return
    if parsed.is_wildcard:
        errors.add(node, "output_format", f"gives the wildcard {out!r} for {ref}")


def parse_recipe(path: Path, text: str) -> Recipe:
    """Validate one recipe's text; raise RecipeError listing every problem found."""
    errors = _Collector(path)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError([f"{path}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}:1: invalid YAML: {exc}"]) from None
    if root is None:
        raise RecipeError([f"{path}:1: the recipe is empty"])
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError([f"{path}:{root.start_mark.line + 1}: a recipe is a mapping of keys"])

    values: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in root.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            errors.add(key_node, None, "keys must be plain names")
        elif key in values:
            first = values[key][0].start_mark.line + 1
            errors.add(key_node, key, f"duplicated key (first at line {first})")
        elif key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(KEYS)}"
            errors.add(key_node, key, f"unknown key{hint}")
        else:
            values[key] = (key_node, value_node)
    for key in REQUIRED:
        if key not in values:
            errors.add(root, key, f"missing key ({KEYS[key]})")

    def scalar(key: str) -> tuple[yaml.Node, object] | None:
        if key not in values:
            return None
        node = values[key][1]
        if not isinstance(node, yaml.ScalarNode):
            errors.add(node, key, "must be a single value, not a list or mapping")
            return None
        return node, _scalar(node)

    version = None
    if got := scalar("version"):
        node, version = got
        if type(version) is not int or version != 1:
            errors.add(node, "version", f"must be 1, got {version!r}")
    user = None
    if got := scalar("user"):
        node, user = got
        if not isinstance(user, str) or not user.strip():
            errors.add(node, "user", f"must be a non-empty string, got {user!r}")
            user = None
    cvmfs_repo = None
    if got := scalar("cvmfs_repo"):
        node, cvmfs_repo = got
        if not isinstance(cvmfs_repo, str) or not _REPO_NAME.match(cvmfs_repo):
            errors.add(node, "cvmfs_repo", f"must be a repository name like unpacked.cern.ch, "
                       f"got {cvmfs_repo!r}")
            cvmfs_repo = None
    output_format = output_node = None
    if got := scalar("output_format"):
        output_node = got[0]
        output_format = _check_template(errors, got[0], "output_format", got[1])
        if output_format and user is None and "user" not in values:
            errors.add(got[0], "user", "missing key (output_format pushes thin images as user)")
    public_path = DEFAULT_PUBLIC_PATH
    public_node = None
    if got := scalar("public_path"):
        public_node = got[0]
        public_path = _check_template(errors, got[0], "public_path", got[1]) or DEFAULT_PUBLIC_PATH

    inputs: list[Input] = []
    if "input" in values:
        node = values["input"][1]
        if not isinstance(node, yaml.SequenceNode):
            errors.add(node, "input", "must be a list of images")
        elif not node.value:
            errors.add(node, "input", "is empty: list at least one image")
        else:
            seen: dict[str, int] = {}
            for item in node.value:
                line = item.start_mark.line + 1
                written = _scalar(item) if isinstance(item, yaml.ScalarNode) else None
                if not isinstance(written, str):
                    errors.add(item, "input", "each entry must be an image reference string")
                    continue
                try:
                    ref = reference.parse(written)
                except BadReference as exc:
                    errors.add(item, "input", str(exc))
                    continue
                if ref.name in seen:
                    errors.add(item, "input", f"{written!r} duplicates line {seen[ref.name]}")
                    continue
                seen[ref.name] = line
                _check_public_path(errors, public_node or item, public_path, ref)
                if output_format and output_node is not None:
                    _check_output(errors, output_node, output_format, ref)
                inputs.append(Input(ref, written, line))
    if errors.lines:
        raise RecipeError(errors.lines)
    return Recipe(path, version, user, cvmfs_repo, output_format, public_path, tuple(inputs))


def recipe_files(path: Path) -> list[Path]:
    """A recipe file, or every ``*.yaml``/``*.yml`` of a folder in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")
                      and p.is_file() and not p.name.startswith("."))
    return [path]


_LOADED: dict[tuple, list[Recipe]] = {}


def load(paths: list[Path] | Path) -> list[Recipe]:
    """Read recipes from files and folders; raise one RecipeError listing every problem.

    Parsed once per process while the files are unchanged (a run asks several times).
    """
    if isinstance(paths, Path):
        paths = [paths]
    key = tuple(_signature(p) for p in paths)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load(paths)
    return list(_LOADED[key])


def _signature(path: Path) -> tuple:
    files = recipe_files(path) if path.exists() else []
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append((str(f), 0, 0))
    return (str(path), tuple(stats))


def _load(paths: list[Path]) -> list[Recipe]:
    recipes: list[Recipe] = []
    problems: list[str] = []
    for given in paths:
        if not given.exists():
            problems.append(f"{given}: no such recipe file or folder")
            continue
        files = recipe_files(given)
        if not files:
            problems.append(f"{given}: no *.yaml recipe in this folder")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{file}: cannot read: {exc}")
                continue
            try:
                recipes.append(parse_recipe(file, text))
            except RecipeError as exc:
                problems.extend(exc.lines)
    problems.extend(_clashes(recipes))
    if problems:
        raise RecipeError(problems)
    return recipes


def _clashes(recipes: list[Recipe]) -> list[str]:
    """Two recipes writing the same public path of the same repository would fight each run."""
    owner: dict[tuple[str, str], tuple[Path, int]] = {}
    lines = []
    for recipe in recipes:
        for item in recipe.inputs:
            key = (recipe.cvmfs_repo, posixpath.normpath(recipe.public_path_of(item.ref)))
            if key in owner:
                path, line = owner[key]
                lines.append(f"{recipe.path}:{item.line}: input: {item.written!r} has the same "
                             f"public path as {path}:{line} in {recipe.cvmfs_repo}")
            else:
                owner[key] = (recipe.path, item.line)
    return lines
