"""The resolve step: recipes -> resolved state, over the network, concurrently per registry.

This is the only step that talks to registries before tasks are made: an unchanged tag costs
one HEAD; a wildcard costs one tag listing (only tags that pass the tag grammar are used).
Failures are kept per input, never fatal for others. The threads are daemons and the main
thread waits in short steps, so SIGINT/SIGTERM end a resolve at once.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BadReference, NotFound, UnpackedError, sanitize
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
    platforms: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass
class Head:
    """A HEAD's answer: the digest the tag points at (None: unsaid), or why it failed."""

    top: str | None
    error: UnpackedError | None = None


@dataclass
class Outcome:
    wanted: Wanted
    resolved: Resolved | None = None
    error: str | None = None
    changed: bool = False


def match_tags(pattern: str, tags: Iterable[str]) -> list[str]:
    """Tags matching a glob (``*``, ``?``, ``[...]``), case-sensitively, sorted."""
    return sorted(t for t in tags if fnmatch.fnmatchcase(t, pattern))


def _expanded(item: Input, tags: list[str]) -> list[ImageRef]:
    refs = []
    for tag in tags:
        try:
            refs.append(item.ref.with_tag(tag))
        except BadReference:
            continue            # a tag cached by an older version: grammar says no
    return refs


def expand(recipes: list[Recipe], state: State, platforms_of: Callable) -> list[Wanted]:
    """Every wanted image from the recipes, wildcards as last expanded (offline)."""
    out = []
    for recipe in recipes:
        platforms = platforms_of(recipe)
        for item in recipe.inputs:
            refs = _expanded(item, state.tags(item.ref.name) or []) if item.ref.is_wildcard \
                else [item.ref]
            out.extend(Wanted(recipe, item, ref, platforms) for ref in refs)
    return merge_platforms(out)


def merge_platforms(wanted: list[Wanted]) -> list[Wanted]:
    """An image named by several recipes is resolved once, for every platform any of them
    asks for (``all`` covers the rest)."""
    union: dict[str, tuple[str, ...]] = {}
    for w in wanted:
        union[w.name] = tuple(dict.fromkeys(union.get(w.name, ()) + w.platforms))
    for w in wanted:
        w.platforms = ("all",) if "all" in union[w.name] else union[w.name]
    return wanted


def run_parallel(func: Callable, items: list, threads: int,
                 meanwhile: Callable[[], object] = lambda: None) -> list:
    """``[func(x) for x in items]`` on daemon threads; the caller stays interruptible.
    ``meanwhile`` runs in the calling thread while they work. When it or the wait is cut
    short (its error, a signal), or an item raises, the threads take no further item: each
    ends with the one it has (a daemon thread cannot be stopped mid-request), and the error is
    raised. Results land in place and the caller is woken once, at the end: not once per
    item (ten thousand HEADs, each a wake-up fighting the threads for the GIL)."""
    results: list = [None] * len(items)
    pending = iter(range(len(items)))
    left = [len(items)]
    errors: list[BaseException] = []
    lock, finished, stop = threading.Lock(), threading.Event(), threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                index = next(pending, None)
            if index is None:
                return
            try:
                results[index] = func(items[index])
            except BaseException as exc:        # noqa: BLE001 - handed to the caller
                errors.append(exc)
                stop.set()
                finished.set()
                return
            with lock:
                left[0] -= 1
                if not left[0]:
                    finished.set()

    if items:
        for _ in range(max(1, min(threads, len(items)))):
            threading.Thread(target=worker, daemon=True).start()
    else:
        finished.set()
    try:
        meanwhile()
        while not finished.wait(0.2):       # short steps: a signal's handler runs between
            pass
    finally:
        stop.set()
    if errors:
        raise errors[0]
    return results


class Refresher:
    def __init__(self, client: RegistryClient, state: State, per_registry: int = 4):
        self.client, self.state = client, state
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
                tags, bad = self.client.tags(item.ref)
        except UnpackedError as exc:
            return self.state.tags(item.ref.name) or [], str(exc)
        if bad:
            log.warning("%s: %d tag(s) refused by the tag grammar, e.g. %s", item.ref,
                        len(bad), ", ".join(bad[:3]))
        matched = match_tags(item.ref.tag, tags)
        self.state.put_tags(item.ref.name, matched)
        if not matched:
            return [], f"{item.ref}: no tag matches {item.ref.tag!r}"
        return matched, None

    def head(self, wanted: Wanted) -> Outcome | Head:
        """What the tag points at now (one HEAD), and the image's outcome when the state is
        already read; else the answer, kept for later. The HEAD needs nothing of the state,
        so the threads start at once; the run's main thread reads the state meanwhile (ten
        thousand images: 0.14 s, which every thread used to wait for at its first image)."""
        try:
            if wanted.ref.digest:
                got = Head(wanted.ref.digest)
            else:
                with self._limit(wanted.ref.api_host):
                    got = Head(self.client.head_manifest(wanted.ref, wanted.ref.tag))
        except UnpackedError as exc:
            got = Head(None, exc)
        return self.resolve_one(wanted, got) if self.state.read_whole else got

    def resolve_one(self, wanted: Wanted, head: Head | None = None) -> Outcome:
        """The image's outcome: from the state when ``head`` (its HEAD's answer, if made)
        says the tag has not moved, else resolved anew."""
        known = self.state.resolved(wanted.name)
        try:
            if head is not None and head.error is not None:
                raise head.error
            with self._limit(wanted.ref.api_host):
                resolved = self.client.resolve(wanted.ref, wanted.platforms, known,
                                               head.top if head is not None else None,
                                               headed=head is not None)
        except UnpackedError as exc:
            gone = isinstance(exc, NotFound) and exc.status == 404
            reason = sanitize(exc, 500)
            self.state.put_failure(wanted.name, reason, gone=gone)
            return Outcome(wanted, known, reason)
        changed = known is None or known.top_digest != resolved.top_digest \
            or known.wanted != resolved.wanted
        if resolved is not known:
            self.state.put_resolved(resolved)
        self.state.put_failure(wanted.name, None)
        # light: the documents' bytes of thousands of moved tags are not held to the end
        return Outcome(wanted, resolved if resolved is known else resolved.light(), None,
                       changed)

    def run(self, recipes: list[Recipe], platforms_of: Callable, threads: int | None = None,
            meanwhile: Callable[[], object] = lambda: None) -> tuple[list[Outcome], list[str]]:
        """Resolve everything; returns outcomes per image and errors of wildcard expansion.
        Threads: as many as requests may be in flight (more only fight for the GIL).
        ``meanwhile`` runs in this thread while the manifests are asked for (after the tag
        listings of wildcards)."""
        problems: list[str] = []
        hosts = {i.ref.api_host for r in recipes for i in r.inputs}
        threads = threads or max(1, min(64, self.per_registry * len(hosts)))
        items = [(r, i) for r in recipes for i in r.inputs]
        wildcards = [i for _, i in items if i.ref.is_wildcard]
        expansions = dict(zip(map(id, wildcards),
                              run_parallel(self.expand_wildcard, wildcards, threads),
                              strict=True))
        wanted: list[Wanted] = []
        for recipe, item in items:
            platforms = platforms_of(recipe)
            if not item.ref.is_wildcard:
                wanted.append(Wanted(recipe, item, item.ref, platforms))
                continue
            tags, error = expansions[id(item)]
            if error:
                problems.append(f"{recipe.path}:{item.line}: {error}")
            wanted.extend(Wanted(recipe, item, ref, platforms) for ref in _expanded(item, tags))
        wanted = merge_platforms(wanted)
        firsts = list({w.name: w for w in reversed(wanted)}.values())[::-1]
        got = run_parallel(self.head, firsts, threads, meanwhile)
        later = [(w, h) for w, h in zip(firsts, got, strict=True) if isinstance(h, Head)]
        done = {o.wanted.name: o for o in got if isinstance(o, Outcome)}
        done.update((o.wanted.name, o) for o in run_parallel(
            lambda pair: self.resolve_one(*pair), later, threads))
        return [Outcome(w, done[w.name].resolved, done[w.name].error, done[w.name].changed)
                for w in wanted], problems
