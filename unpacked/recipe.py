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
from .reference import ImageRef, Platform

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

DEFAULT_PUBLIC_PATH = "$(registry)/$(repository)$(reference)"
RESERVED = (".layers", ".flat", ".metadata", ".multiarch", ".cvmfscatalog", ".cvmfsdirtab",
            ".unpacked")
KEYS = {
    "version": "must be 1",
    "user": "the account that pushes thin images",
    "cvmfs_repo": "the CVMFS repository written, e.g. unpacked.cern.ch",
    "output_format": "where thin images go, with $(...) placeholders (optional)",
    "public_path": "the public path inside the repository, with $(...) placeholders (optional)",
    "input": "the list of images to convert",
    "platforms": "which platforms of multi-arch images to convert (optional; or 'all')",
}
REQUIRED = ("version", "cvmfs_repo", "input")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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
    platforms: tuple[str, ...] | None = None     # None: the platforms setting

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


class _Unreadable:
    """A scalar YAML could not construct (``2024-02-30``, ``!!int one``): never valid."""

    def __init__(self, node: yaml.Node, why: str):
        self.text, self.why = node.value, why

    def __repr__(self) -> str:
        return f"{self.text!r} ({self.why})"


def _scalar(node: yaml.Node) -> object:
    """Construct one scalar node with YAML's own typing (1 is int, 'a' is str, true is bool);
    a value YAML cannot construct becomes an ``_Unreadable`` that every check refuses."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        return _Unreadable(node, str(getattr(exc, "problem", None) or exc).split("\n")[0])


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


def _compose(path: Path, text: str) -> yaml.MappingNode:
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
    return root


class _Fields:
    """The recipe's keys and value nodes, with the checks each key needs."""

    def __init__(self, errors: _Collector, root: yaml.MappingNode):
        self.errors = errors
        self.values: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in root.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                errors.add(key_node, None, "keys must be plain names")
            elif key in self.values:
                first = self.values[key][0].start_mark.line + 1
                errors.add(key_node, key, f"duplicated key (first at line {first})")
            elif key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(KEYS)}"
                errors.add(key_node, key, f"unknown key{hint}")
            else:
                self.values[key] = (key_node, value_node)
        for key in REQUIRED:
            if key not in self.values:
                errors.add(root, key, f"missing key ({KEYS[key]})")

    def node(self, key: str) -> yaml.Node | None:
        return self.values[key][1] if key in self.values else None

    def scalar(self, key: str) -> tuple[yaml.Node, object] | None:
        node = self.node(key)
        if node is None:
            return None
        if not isinstance(node, yaml.ScalarNode):
            self.errors.add(node, key, "must be a single value, not a list or mapping")
            return None
        return node, _scalar(node)

    def version(self) -> int | None:
        got = self.scalar("version")
        if got and (type(got[1]) is not int or got[1] != 1):
            self.errors.add(got[0], "version", f"must be 1, got {got[1]!r}")
            return None
        return got[1] if got else None

    def text(self, key: str, check=None, hint: str = "a non-empty string") -> str | None:
        got = self.scalar(key)
        if not got:
            return None
        node, value = got
        if not isinstance(value, str) or not value.strip() or (check and not check(value)):
            self.errors.add(node, key, f"must be {hint}, got {value!r}")
            return None
        return value

    def template(self, key: str) -> str | None:
        got = self.scalar(key)
        return _check_template(self.errors, got[0], key, got[1]) if got else None

    def platforms(self) -> tuple[str, ...] | None:
        node = self.node("platforms")
        if node is None:
            return None
        items = [node] if isinstance(node, yaml.ScalarNode) else node.value \
            if isinstance(node, yaml.SequenceNode) else None
        values = [_scalar(i) for i in items or [] if isinstance(i, yaml.ScalarNode)]
        if not items or len(values) != len(items) or \
                not all(isinstance(v, str) for v in values):
            self.errors.add(node, "platforms", "must be 'all' or a list of os/arch[/variant]")
            return None
        if values == ["all"]:
            return ("all",)
        for value in values:
            try:
                Platform.parse(value)
            except ValueError:
                self.errors.add(node, "platforms", f"{value!r} is not os/arch[/variant] "
                                "(e.g. linux/arm64/v8), nor 'all'")
                return None
        return tuple(dict.fromkeys(values))


def _inputs(errors: _Collector, node: yaml.Node | None, public_path: str,
            public_node: yaml.Node | None) -> list[Input]:
    inputs: list[Input] = []
    if node is None:
        return inputs
    if not isinstance(node, yaml.SequenceNode):
        errors.add(node, "input", "must be a list of images")
        return inputs
    if not node.value:
        errors.add(node, "input", "is empty: list at least one image")
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
        inputs.append(Input(ref, written, line))
    return inputs


def parse_recipe(path: Path, text: str) -> Recipe:
    """Validate one recipe's text; raise RecipeError listing every problem found."""
    errors = _Collector(path)
    fields = _Fields(errors, _compose(path, text))
    version = fields.version()
    user = fields.text("user")
    cvmfs_repo = fields.text("cvmfs_repo", _REPO_NAME.match,
                             "a repository name like unpacked.cern.ch (at most 200 characters)")
    output_format = fields.template("output_format")
    if output_format and "user" not in fields.values:
        errors.add(fields.values["output_format"][0], "user",
                   "missing key (output_format pushes thin images as user)")
    public_path = fields.template("public_path") or DEFAULT_PUBLIC_PATH
    public_node = fields.node("public_path")
    inputs = _inputs(errors, fields.node("input"), public_path, public_node)
    if output_format:
        for item in inputs:
            _check_output(errors, fields.node("output_format"), output_format, item.ref)
    platforms = fields.platforms()
    if errors.lines:
        raise RecipeError(errors.lines)
    return Recipe(path, version, user, cvmfs_repo, output_format, public_path, tuple(inputs),
                  platforms)


def recipe_files(path: Path) -> list[Path]:
    """A recipe file, or every ``*.yaml``/``*.yml`` of a folder in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")
                      and p.is_file() and not p.name.startswith("."))
    return [path]


@dataclass
class RecipeSet:
    """The recipes read, and what was wrong: a broken file is skipped, never fatal for the
    others (its images are kept as published: garbage collection stands still)."""

    recipes: list[Recipe]
    problems: list[str]
    broken: list[Path]

    @property
    def repos(self) -> list[str]:
        return sorted({r.cvmfs_repo for r in self.recipes})


def read(paths: list[Path] | Path, parse=parse_recipe) -> RecipeSet:
    """Read recipes from files and folders; a file with problems is listed, not loaded.
    ``parse``: ``parse_recipe``, or one that keeps its results."""
    if isinstance(paths, Path):
        paths = [paths]
    recipes: list[Recipe] = []
    problems: list[str] = []
    broken: list[Path] = []
    for given in paths:
        if not given.exists():
            problems.append(f"{given}: no such recipe file or folder")
            broken.append(given)
            continue
        files = recipe_files(given)
        if not files:
            problems.append(f"{given}: no *.yaml recipe in this folder")
            broken.append(given)
        for file in files:
            try:
                recipes.append(parse(file, _text(file)))
            except RecipeError as exc:
                problems.extend(exc.lines)
                broken.append(file)
    for recipe, lines in _clashes(recipes):
        problems.extend(lines)
        broken.append(recipe.path)
        recipes.remove(recipe)
    return RecipeSet(recipes, problems, broken)


def load(paths: list[Path] | Path) -> list[Recipe]:
    """Read recipes; raise one RecipeError listing every problem (``unpacked check``)."""
    found = read(paths)
    if found.problems:
        raise RecipeError(found.problems)
    return found.recipes


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) \
            from None


def _clashes(recipes: list[Recipe]) -> list[tuple[Recipe, list[str]]]:
    """Two recipes writing the same public path of the same repository would fight each run:
    the later file is refused."""
    owner: dict[tuple[str, str], tuple[Path, int]] = {}
    refused: dict[int, tuple[Recipe, list[str]]] = {}
    for recipe in recipes:
        for item in recipe.inputs:
            key = (recipe.cvmfs_repo, posixpath.normpath(recipe.public_path_of(item.ref)))
            if key in owner and owner[key][0] != recipe.path:
                path, line = owner[key]
                refused.setdefault(id(recipe), (recipe, []))[1].append(
                    f"{recipe.path}:{item.line}: input: {item.written!r} has the same public "
                    f"path as {path}:{line} in {recipe.cvmfs_repo}")
            else:
                owner.setdefault(key, (recipe.path, item.line))
    return list(refused.values())
