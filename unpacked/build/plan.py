"""The plan of a run: recipes, the resolved state and doit's records, read offline.

Task generation, the run's start and end, and ``unpacked gc`` all work from it; building it
never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field, fields
from pathlib import Path

from doit import get_var

from .. import recipe as recipes
from .. import settings as settings_mod
from ..errors import UnpackedError
from ..recipe import Input, Recipe
from ..reference import ImageRef
from ..registry.resolved import Resolved
from ..settings import Settings
from .context import context
from .refresh import expand

SANDBOX_VERSION = 1          # bump when the sandbox files change: every flat image is rebuilt

_SETTINGS: Settings | None = None


def current_settings() -> Settings:
    """Settings of this doit invocation: ``doit name=value`` > ``UNPACKED_NAME`` > default."""
    global _SETTINGS
    if _SETTINGS is None:
        variables = {}
        for f in fields(Settings):
            value = get_var(f.name, None)
            if value is not None:
                variables[f.name] = value
        _SETTINGS = settings_mod.load(variables, project=Path.cwd())
    return _SETTINGS


@dataclass
class ImagePlan:
    recipe: Recipe
    input: Input
    ref: ImageRef
    resolved: Resolved | None
    failure: str | None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def repo(self) -> str:
        return self.recipe.cvmfs_repo

    @property
    def public(self) -> str:
        return self.recipe.public_path_of(self.ref)


@dataclass
class Plan:
    settings: Settings
    images: list[ImagePlan] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)     # digest -> info
    flats: dict[str, dict] = field(default_factory=dict)      # config digest -> info
    repos: list[str] = field(default_factory=list)
    recipes: list[Recipe] = field(default_factory=list)
    recorded: dict[str, dict] = field(default_factory=dict)   # task id -> values, doit's DB


def load_recipes(s: Settings) -> list[Recipe]:
    return recipes.load(s.recipe_path)


def recorded_tasks(s: Settings) -> dict[str, dict]:
    """Tasks doit has recorded as done, with their saved values (one query, read-only)."""
    path = s.cache_dir / "doit.sqlite"
    if not path.exists():
        return {}
    out = {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            for task_id, data in db.execute("select task_id, task_data from doit"):
                try:
                    out[task_id] = json.loads(data).get("_values_:") or {}
                except (ValueError, AttributeError):
                    out[task_id] = {}
    except sqlite3.Error:
        return {}
    return out


def build_plan(s: Settings) -> Plan:
    plan = Plan(s)
    loaded = load_recipes(s)
    state = context(s).state
    plan.repos = sorted({r.cvmfs_repo for r in loaded})
    plan.recipes = loaded
    plan.recorded = recorded_tasks(s)
    for wanted in expand(loaded, state):
        resolved = state.resolved(wanted.name, s.platform)
        failure = state.failure(wanted.name)
        item = ImagePlan(wanted.recipe, wanted.input, wanted.ref, resolved, failure)
        plan.images.append(item)
        if resolved is None:
            continue
        for layer in resolved.layers:
            entry = plan.layers.setdefault(layer.digest, {
                "layer": layer, "ref": wanted.ref, "repos": set(), "images": []})
            entry["repos"].add(item.repo)
            entry["images"].append(item.name)
        flat = plan.flats.setdefault(resolved.config_digest, {
            "name": item.name, "resolved": resolved, "repos": set(), "images": []})
        flat["repos"].add(item.repo)
        flat["images"].append(item)
    return plan


_PLAN: Plan | None = None


def current_plan() -> Plan:
    """The plan, built once per process (a run resolves before doit asks for tasks)."""
    global _PLAN
    if _PLAN is None:
        _PLAN = build_plan(current_settings())
    return _PLAN


def recipes_or_none(s: Settings) -> list[Recipe]:
    try:
        return load_recipes(s)
    except UnpackedError:
        return []


def thin_targets(items: list[ImagePlan]) -> tuple[list[tuple], str]:
    """Where an image's thin images go, and the key that says they are pushed as they are."""
    from ..image import thin
    resolved = items[0].resolved
    targets = [(i.repo, i.input.written, i.recipe.output_of(i.ref), i.recipe.user)
               for i in items if i.recipe.output_format]
    key = hashlib.sha256(json.dumps(
        [thin.key(origin, repo, output, resolved) for repo, origin, output, _ in targets]
    ).encode()).hexdigest()
    return targets, key



# -- what garbage collection must keep -----------------------------------------------------------

def gc_wants(plan: Plan, repo: str):
    """What the recipes want kept in ``repo``, from the plan (offline)."""
    from ..repo import gc
    state = context(plan.settings).state
    wants = gc.Wants()
    for r in plan.recipes:
        if r.cvmfs_repo == repo:
            wants.wildcards += [(i.ref.registry, i.ref.repository, i.ref.tag)
                                for i in r.inputs if i.ref.is_wildcard]
            wants.roots.add(r.public_path.split("/", 1)[0])
    by_name: dict[str, list[ImagePlan]] = {}
    for item in plan.images:
        if item.repo != repo:
            continue
        by_name.setdefault(item.name, []).append(item)
        wants.names.add(item.name)
        if state.gone(item.name):
            wants.gone.add(item.name)
        if item.resolved is not None:
            wants.flats.add(item.resolved.config_digest)
            wants.layers.update(x.digest for x in item.resolved.layers)
    for name, items in by_name.items():
        if items[0].resolved is None or not any(i.recipe.output_format for i in items):
            continue
        _, key = thin_targets(items)
        if plan.recorded.get(f"thin:{name}", {}).get("key") != key:
            wants.thin_pending.add(name)
    return wants


def gc_plan(plan: Plan, repo: str, save: bool):
    """The garbage collection of ``repo`` now; ``save`` records the clocks."""
    from ..repo import gc
    s = plan.settings
    clocks_file = gc.Clocks(s.cache_dir, repo)
    clocks = clocks_file.load()
    result = gc.compute(context(s).publisher(repo).repository(), repo, gc_wants(plan, repo),
                        clocks, s.clock(), s.gc_grace, s.gc_image_grace, s.gc_max_deletions,
                        s.gc_prune_gone)
    if save:
        clocks_file.save(clocks)
    return result
