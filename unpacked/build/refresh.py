"""Resolve step: recipes -> resolved state, over the network, concurrently per registry.

This is the only step that talks to registries before tasks are made: an unchanged tag costs
one HEAD; a wildcard costs one tag listing. Failures are kept per input, never fatal for others.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import NotFound, UnpackedError
from ..recipe import Input, Recipe
from ..reference import ImageRef
from ..registry.resolved import Resolved
from .state import State

if TYPE_CHECKING:        # `doit list` must not pay for importing requests
    from ..registry.client import RegistryClient

log = logging.getLogger(__name__)


@dataclass
class Wanted:
    """One image a recipe wants, with wildcards expanded."""

    recipe: Recipe
    input: Input
    ref: ImageRef

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass
class Outcome:
    wanted: Wanted
    resolved: Resolved | None = None
    error: str | None = None
    changed: bool = False


def match_tags(pattern: str, tags: list[str]) -> list[str]:
    """Tags matching a glob (``*``, ``?``, ``[...]``), case-sensitively, sorted."""
    return sorted(t for t in tags if fnmatch.fnmatchcase(t, pattern))


def expand(recipes: list[Recipe], state: State) -> list[Wanted]:
    """Every wanted image from the recipes, wildcards as last expanded (offline)."""
    out = []
    for recipe in recipes:
        for item in recipe.inputs:
            if item.ref.is_wildcard:
                for tag in state.tags(item.ref.name) or []:
                    out.append(Wanted(recipe, item, item.ref.with_tag(tag)))
            else:
                out.append(Wanted(recipe, item, item.ref))
    return out


class Resolver:
    def __init__(self, client: RegistryClient, state: State, platform: str, per_registry: int = 4):
        self.client, self.state, self.platform = client, state, platform
        self.per_registry = max(1, per_registry)
        self._limits: dict[str, threading.Semaphore] = defaultdict(
            lambda: threading.Semaphore(self.per_registry))
        self._lock = threading.Lock()

    def _limit(self, host: str) -> threading.Semaphore:
        with self._lock:
            return self._limits[host]

    def expand_wildcard(self, item: Input) -> tuple[list[str], str | None]:
        """List the repository's tags and keep the matches; on failure keep the last list."""
        try:
            with self._limit(item.ref.api_host):
                tags = match_tags(item.ref.tag, self.client.tags(item.ref))
        except UnpackedError as exc:
            return self.state.tags(item.ref.name) or [], str(exc)
        self.state.put_tags(item.ref.name, tags)
        if not tags:
            return [], f"{item.ref}: no tag matches {item.ref.tag!r}"
        return tags, None

    def resolve_one(self, wanted: Wanted) -> Outcome:
        known = self.state.resolved(wanted.name, self.platform)
        try:
            with self._limit(wanted.ref.api_host):
                resolved = self.client.resolve(wanted.ref, self.platform, known)
        except UnpackedError as exc:
            gone = isinstance(exc, NotFound) and exc.status == 404
            self.state.put_failure(wanted.name, str(exc), gone=gone)
            return Outcome(wanted, known, str(exc))
        changed = known is None or known.manifest_digest != resolved.manifest_digest
        if resolved is not known:
            self.state.put_resolved(resolved)
        self.state.put_failure(wanted.name, None)
        return Outcome(wanted, resolved, None, changed)

    def run(self, recipes: list[Recipe], threads: int = 16) -> tuple[list[Outcome], list[str]]:
        """Resolve everything; returns outcomes per image and errors of wildcard expansion."""
        problems: list[str] = []
        wanted: list[Wanted] = []
        items = [(r, i) for r in recipes for i in r.inputs]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            wildcards = {(id(r), i.line): pool.submit(self.expand_wildcard, i)
                         for r, i in items if i.ref.is_wildcard}
            for recipe, item in items:
                if not item.ref.is_wildcard:
                    wanted.append(Wanted(recipe, item, item.ref))
                    continue
                tags, error = wildcards[(id(recipe), item.line)].result()
                if error:
                    problems.append(f"{recipe.path}:{item.line}: {error}")
                wanted.extend(Wanted(recipe, item, item.ref.with_tag(t)) for t in tags)
            outcomes = list(pool.map(self.resolve_one, wanted))
        return outcomes, problems
