"""The plan of a run: recipes, the resolved state and doit's records, read offline.

Task generation, the run's start and end, and ``unpacked gc``/``status`` all work from it;
building it never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from functools import cached_property

from ..recipe import Input, Recipe
from ..reference import ImageRef
from ..registry.resolved import Layer, PlatformImage, Resolved
from ..repo import gc
from ..repo.layout import MULTIARCH, Repository, hex_of, public_target
from . import doit_private
from .refresh import expand

SANDBOX_VERSION = 1          # bump when the sandbox files change: every flat image is rebuilt


@dataclass
class ImagePlan:
    """One image a recipe wants (a wildcard's tag expanded), and what it resolved to."""

    recipe: Recipe
    input: Input
    ref: ImageRef
    resolved: Resolved | None
    failure: str | None
    _thin_keys: dict | None = field(default=None, repr=False, compare=False)  # thin_targets'

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def repo(self) -> str:
        return self.recipe.cvmfs_repo

    @cached_property
    def public(self) -> str:
        return self.recipe.public_path_of(self.ref)

    @property
    def images(self) -> list[PlatformImage]:
        """Light (``Resolved.light``): digests, platforms and layers, not the documents."""
        return self.resolved.images if self.resolved else []

    def whole_images(self, state) -> list[PlatformImage]:
        """``images`` with their manifest and config bytes, read from the cache (a thin
        image's key hashes parts of the config) and not kept; [] when the cache no longer
        holds what the plan was made from."""
        whole = state.resolved(self.name, with_bytes=True) if self.resolved else None
        return whole.images if whole is not None and whole.light() == self.resolved else []

    @property
    def multiarch(self) -> bool:
        """Converted for several platforms: DUCC's ``.multiarch`` layout."""
        return len(self.images) > 1


SOURCES = 8         # the images a layer's ingest may fetch it through, in recipe order


@dataclass(slots=True)
class LayerPlan:
    digest: str
    task: str                    # ``layer:<hex>``, named once (states, deps, generators)
    # (url, layer) of the first SOURCES images that have it: the ingest's arguments as they are
    sources: list[tuple[str, Layer]] = field(default_factory=list)
    repos: set[str] = field(default_factory=set)
    images: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        """``.layers/<folder>``: the digest's hex (checked when the task was named)."""
        return self.task.partition(":")[2]


@dataclass(slots=True)
class FlatPlan:
    config: str
    task: str                    # ``flat:<hex>``
    name: str                    # the first image that needs it (for messages)
    image: PlatformImage
    repos: set[str] = field(default_factory=set)
    images: list[ImagePlan] = field(default_factory=list)

    @property
    def folder(self) -> str:
        """``.flat/<folder>``: the config digest's hex (checked when the task was named)."""
        return self.task.partition(":")[2]


@dataclass
class Plan:
    images: list[ImagePlan] = field(default_factory=list)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    flats: dict[str, FlatPlan] = field(default_factory=dict)
    repos: list[str] = field(default_factory=list)
    recorded: dict[str, dict] = field(default_factory=dict)   # task id -> values, doit's DB
    clashes: dict[str, str] = field(default_factory=dict)      # image name -> why refused

    def users(self, task: str) -> list[str]:
        """The images a ``layer:`` or ``flat:`` task serves: whom its failure is reported
        for. Looked up when one fails, not kept on each of tens of thousands of tasks."""
        kind, _, folder = task.partition(":")
        entries = {"layer": self.layers, "flat": self.flats}.get(kind, {})
        for algorithm in ("sha256", "sha512"):      # the digests a folder name may be of
            entry = entries.get(f"{algorithm}:{folder}")
            if isinstance(entry, LayerPlan):
                return entry.images
            if isinstance(entry, FlatPlan):
                return [i.name for i in entry.images]
        return []

    def by_name(self) -> dict[str, list[ImagePlan]]:
        """Images grouped by name: one name may be wanted by several recipes (repositories)."""
        groups: dict[str, list[ImagePlan]] = {}
        for item in self.images:
            groups.setdefault(item.name, []).append(item)
        return groups


def multiarch_name(arch: str, name: str) -> str:
    """``.multiarch/<arch>[:<variant>]/<registry>/<repository>:<tag>`` (DUCC's path)."""
    return f"{MULTIARCH}/{arch}/{name}"


def public_link(public: str, name: str, first: PlatformImage, multiarch: bool,
                variant_default: str, variant: bool) -> str:
    """The public path's symlink text: the (first platform's) flat image itself, or for
    several platforms on the cvmfs publisher a CVMFS variant symlink through
    ``$(CVMFS_ARCH)``, as DUCC makes it."""
    if multiarch and variant:
        return f"{'../' * public.count('/')}{MULTIARCH}/$(CVMFS_ARCH:-{variant_default})/{name}"
    return public_target(public, first.config_digest)


def build_plan(ctx) -> Plan:
    """Everything a run or an inspection works from (offline)."""
    s = ctx.settings
    plan = Plan()
    recipes = ctx.recipes.recipes
    plan.repos = sorted({r.cvmfs_repo for r in recipes})
    plan.recorded = doit_private.recorded_values(s.cache_dir / "doit.sqlite")
    state = ctx.state
    for wanted in expand(recipes, state, ctx.platforms_of):
        resolved = state.resolved(wanted.name)
        if resolved is not None and resolved.wanted != wanted.platforms:
            resolved = None             # resolved for other platforms: resolved again
        item = ImagePlan(wanted.recipe, wanted.input, wanted.ref, resolved,
                         state.failure(wanted.name))
        plan.images.append(item)
    plan.clashes = _clashes(plan.images, ctx)
    for item in plan.images:
        if item.name in plan.clashes:
            continue
        for image in item.images:
            _add_image(plan, item, image)
    return plan


def _add_image(plan: Plan, item: ImagePlan, image: PlatformImage) -> None:
    for layer in image.layers:
        entry = plan.layers.get(layer.digest)
        if entry is None:
            entry = plan.layers[layer.digest] = LayerPlan(
                layer.digest, doit_private.task_name("layer", hex_of(layer.digest)))
        if len(entry.sources) < SOURCES:
            entry.sources.append((item.ref.url, layer))
        entry.repos.add(item.repo)
        entry.images.append(item.name)
    flat = plan.flats.get(image.config_digest)
    if flat is None:
        flat = plan.flats[image.config_digest] = FlatPlan(
            image.config_digest, doit_private.task_name("flat", hex_of(image.config_digest)),
            item.name, image)
    flat.repos.add(item.repo)
    flat.images.append(item)


def _clashes(images: list[ImagePlan], ctx) -> dict[str, str]:
    """Two different images that send one public path (a wildcard's new tag, a template
    without the tag): the image already published there keeps it, else the first listed;
    the others are refused (the recipe check cannot see expanded tags)."""
    claims: dict[tuple[str, str], list[ImagePlan]] = {}
    for item in images:
        claims.setdefault((item.repo, posixpath.normpath(item.public)), []).append(item)
    refused: dict[str, str] = {}
    for (repo, public), items in claims.items():
        names = list(dict.fromkeys(i.name for i in items))
        if len(names) < 2:
            continue
        owner = _published_at(ctx, repo, public, names) or names[0]
        for name in names:
            if name != owner:
                refused[name] = (f"{name}: its public path {public} belongs to {owner} in "
                                 f"{repo}; not converted")
    return refused


def _published_at(ctx, repo: str, public: str, names: list[str]) -> str | None:
    """Which of ``names`` the repository's metadata says is published at ``public``."""
    repository = ctx.publisher(repo).repository()
    for name in names:
        record = repository.read_json(repository.metadata_rel(name), "image.json") or {}
        if record.get("public_path") == public:
            return name
    return None


def thin_targets(items: list[ImagePlan], state) -> tuple[list[tuple], str]:
    """Where an image's thin images go, and the key that says they are pushed as they are
    (an empty key when the cache lost the image's config: never up to date)."""
    from ..image import thin
    targets = [(i.repo, i.input.written, i.recipe.output_of(i.ref), i.recipe.user)
               for i in items if i.recipe.output_format]
    first = items[0]
    keys = first._thin_keys = first._thin_keys or {}     # per plan: the tasks, gc and states
    known = keys.get(tuple(targets))
    if known is not None:
        return targets, known
    images = first.whole_images(state)
    key = hashlib.sha256(json.dumps(
        [[thin.key(origin, repo, output, image) for image in images]
         for repo, origin, output, _ in targets]).encode()).hexdigest() if images else ""
    keys[tuple(targets)] = key
    return targets, key


# -- what garbage collection must keep -----------------------------------------------------------

def gc_wants(ctx, plan: Plan, repo: str) -> gc.Wants:
    """What the recipes want kept in ``repo``, from the plan (offline)."""
    state = ctx.state
    wants = gc.Wants()
    wants.frozen = [f"{path} cannot be read as a recipe: no image is unpublished until it is "
                    "fixed" for path in ctx.recipes.broken]
    for r in ctx.recipes.recipes:
        if r.cvmfs_repo == repo:
            wants.wildcards += [(i.ref.registry, i.ref.repository, i.ref.tag)
                                for i in r.inputs if i.ref.is_wildcard]
    for name, items in plan.by_name().items():
        items = [i for i in items if i.repo == repo]
        if not items:
            continue
        wants.names.add(name)
        publics = wants.publics.setdefault(name, set())
        publics.update(i.public for i in items)
        if state.gone(name):
            wants.gone.add(name)
        for image in items[0].images:
            wants.flats.add(image.config_digest)
            wants.layers.update(x.digest for x in image.layers)
            if items[0].multiarch:
                publics.add(multiarch_name(image.arch, name))
                wants.platforms.add(f"{image.arch}/{name}")
        if items[0].images and any(i.recipe.output_format for i in items):
            _, key = thin_targets(items, state)
            if plan.recorded.get(f"thin:{name}", {}).get("key") != key:
                wants.thin_pending.add(name)
    return wants


def gc_policy(settings) -> gc.Policy:
    return gc.Policy(settings.gc_grace, settings.gc_image_grace, settings.gc_max_deletions,
                     settings.gc_prune_gone, settings.gc_max_dropped, settings.clock())


def collection(ctx, wants: gc.Wants, repo: str, clocks: dict[str, float],
               remember: bool = False) -> gc.Collection:
    """The garbage collection of ``repo`` now, keeping what ``wants`` names (``gc_wants``);
    ``clocks`` are updated in place. ``remember``: keep the survey of the repository in
    cache/ (a run does; a look writes nothing)."""
    publisher = ctx.publisher(repo)
    repository: Repository = publisher.repository()
    survey = ctx.settings.cache_dir / "gc" / f"{repo}.images.json"
    return gc.compute(repository, repo, wants, clocks,
                      gc_policy(ctx.settings),
                      gc.Survey.cached(repository, survey, lambda: _stamp(publisher), remember))


def _stamp(publisher) -> list:
    """What a survey of the repository's metadata is valid for: its published revision and
    identity; empty (never cached) while any transaction is under way or without a revision."""
    revision = publisher.revision()
    if not revision or not publisher.settled():
        return []
    try:
        st = os.stat(publisher.root)
    except OSError:
        return []
    return [revision, st.st_dev, st.st_ino]
