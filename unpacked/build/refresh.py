"""The resolve step: recipes -> resolved state, over the network, concurrently per registry.

This is the only step that talks to registries before tasks are made: an unchanged tag costs
one HEAD; a wildcard costs one tag listing (only tags that pass the tag grammar are used).
Failures are kept per input, never fatal for others. The threads are daemons and the main
thread waits in short steps, so SIGINT/SIGTERM end a resolve at once.
"""

from __future__ import annotations

import fnmatch
import logging
import queue
import threading
from collections import defaultdict, deque
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

    def head(self, wanted: Wanted, asked: int | None = None) -> Outcome | Head:
        """What a tag points at now (one HEAD; ``asked``: what a round's lean HEAD had, as
        ``head_manifest`` takes it; digests are never asked), and the image's outcome when
        the state is already read; else the answer, kept for later."""
        try:
            with self._limit(wanted.ref.api_host):
                got = Head(self.client.head_manifest(wanted.ref, wanted.ref.tag, asked))
        except UnpackedError as exc:
            got = Head(None, exc)
        return self.resolve_one(wanted, got) if self.state.read_whole else got

    def settle(self, wanted: Wanted, head: Head) -> Outcome | Head:
        """The outcome when it needs no request (the state is read and the tag has not
        moved), else the answer, kept for later."""
        if self.state.read_whole and _unmoved(wanted, head, self.state.resolved(wanted.name)):
            return self.resolve_one(wanted, head)
        return head

    def heads(self, firsts: list[Wanted], threads: int,
              meanwhile: Callable[[], object]) -> list[Outcome | Head]:
        """Each image's HEAD (or its outcome, as ``head``): see ``HeadPass``."""
        return HeadPass(self, firsts, threads).run(meanwhile)

    def resolve_one(self, wanted: Wanted, head: Head | None = None) -> Outcome:
        """The image's outcome: from the state when ``head`` (its HEAD's answer, if made)
        says the tag has not moved, else resolved anew."""
        known = self.state.resolved(wanted.name)
        try:
            if head is not None and head.error is not None:
                raise head.error
            if head is not None and _unmoved(wanted, head, known):
                resolved = known        # nothing to ask (and no share of the registry taken)
            else:
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
        got = self.heads(firsts, threads, meanwhile)
        done = {o.wanted.name: o for o in got if isinstance(o, Outcome)}
        later = []
        for w, h in zip(firsts, got, strict=True):
            if not isinstance(h, Head):
                continue
            if _unmoved(w, h, self.state.resolved(w.name)):
                done[w.name] = self.resolve_one(w, h)   # no request: not worth a thread
            else:
                later.append((w, h))
        done.update((o.wanted.name, o) for o in run_parallel(
            lambda pair: self.resolve_one(*pair), later, threads))
        return [Outcome(w, done[w.name].resolved, done[w.name].error, done[w.name].changed)
                for w in wanted], problems


class HeadPass:
    """The HEADs of a resolve: in one round on the lean path (one thread, ``per_registry``
    connections to each registry: ``rounds.HeadRound``), and on the full path, by threads,
    for what the round could not settle, meanwhile."""

    def __init__(self, refresher: Refresher, firsts: list[Wanted], threads: int):
        self.refresher, self.firsts, self.threads = refresher, firsts, threads
        self.results: list[Outcome | Head | None] = [None] * len(firsts)
        # (index, the round's status (0: none), the scope to release after) or None: the end
        self.full: queue.SimpleQueue = queue.SimpleQueue()
        self.order = Order(firsts, refresher._limit)
        self.stop = threading.Event()
        lean = refresher.client.lean
        for i, w in enumerate(firsts):
            if w.ref.digest:
                self.results[i] = Head(w.ref.digest)
            elif lean:
                self.order.add(i)
            else:
                self.full.put((i, None, None))

    def run(self, meanwhile: Callable[[], object]) -> list[Outcome | Head]:
        try:
            run_parallel(lambda job: job(), [self.lean] + [self.on_full] * self.threads,
                         self.threads + 1, meanwhile)
        finally:
            self.stop.set()
            self._end_full()
            self.order.release_all()
        return self.results

    def lean(self) -> None:
        try:
            if self.order.bases:
                self.refresher.client.head_round(
                    self.order.bases, self.order.take, self.answered, self.order.more,
                    self.stop, self.refresher.per_registry)
        finally:
            self._end_full()

    def _end_full(self) -> None:
        for _ in range(self.threads):
            self.full.put(None)

    def answered(self, i: int, status: int | None, digest: str | None) -> None:
        """The round's answer for ``i`` (in the round's thread)."""
        self.order.answered(i)
        w = self.firsts[i]
        if status == 200 and digest:
            self.results[i] = self.refresher.settle(w, Head(digest))
        elif status == 401:         # its token is fetched on the full path; its kin wait
            self.full.put((i, 401, self.order.hold(i)))
        else:
            self.full.put((i, status or 0, None))
            if status != 404:       # anything else unusual: the full path, with its retries
                for j in self.order.drop(w.ref.base_url):
                    self.full.put((j, 0, None))

    def on_full(self) -> None:
        while (item := self.full.get()) is not None and not self.stop.is_set():
            i, status, scope = item
            try:
                self.results[i] = self.refresher.head(self.firsts[i], status)
            finally:
                if scope is not None:
                    self.order.release(scope)


def _unmoved(wanted: Wanted, head: Head, known: Resolved | None) -> bool:
    """The tag points where it pointed, for the same platforms: nothing to ask."""
    return head.error is None and head.top is not None and known is not None \
        and known.top_digest == head.top and known.wanted == wanted.platforms


class Order:
    """Which tag the round asks next of each registry, in recipe order, at most as many at
    once as the registry's limit lets (shared with the full path). The tags of a repository
    whose token the full path is fetching (it answered 401) wait for it, then go on the lean
    path with the token; a registry that answered anything else unusual is left to the full
    path. Shared by the round's thread and the full path's."""

    def __init__(self, firsts: list[Wanted], limit: Callable[[str], threading.Semaphore]):
        self.firsts, self.limit = firsts, limit
        self.queues: dict[str, deque[int]] = {}
        self.held: dict[tuple[str, str], list[int]] = {}
        self.asked: dict[int, threading.Semaphore] = {}
        self.lock = threading.Lock()

    @property
    def bases(self) -> list[str]:
        return list(self.queues)

    def _scope(self, i: int) -> tuple[str, str]:
        ref = self.firsts[i].ref
        return ref.base_url, ref.repository

    def add(self, i: int) -> None:
        self.queues.setdefault(self.firsts[i].ref.base_url, deque()).append(i)

    def take(self, base: str) -> tuple[int, ImageRef] | None:
        with self.lock:
            queue = self.queues.get(base)
            while queue:
                i = queue[0]
                held = self.held.get(self._scope(i))
                if held is not None:
                    held.append(queue.popleft())
                    continue
                limit = self.limit(self.firsts[i].ref.api_host)
                if not limit.acquire(blocking=False):
                    return None             # the full path has the registry's share now
                self.asked[queue.popleft()] = limit
                return i, self.firsts[i].ref
            return None

    def answered(self, i: int) -> None:
        with self.lock:
            limit = self.asked.pop(i, None)
        if limit is not None:
            limit.release()

    def release_all(self) -> None:
        """The registries' shares still taken by HEADs the round never answered (it was
        stopped): given back."""
        with self.lock:
            limits, self.asked = list(self.asked.values()), {}
        for limit in limits:
            limit.release()

    def hold(self, i: int) -> tuple[str, str] | None:
        """Hold back the repository of ``i`` (its answer was 401); the scope to release once
        the full path asked ``i``, or None when another tag of it holds it already."""
        scope = self._scope(i)
        with self.lock:
            if scope in self.held:
                return None
            self.held[scope] = []
            return scope

    def release(self, scope: tuple[str, str]) -> None:
        with self.lock:
            waiting = self.held.pop(scope, [])
            self.queues.setdefault(scope[0], deque()).extendleft(reversed(waiting))

    def drop(self, base: str) -> list[int]:
        """Every tag of ``base`` not yet asked, held ones too: for the full path."""
        with self.lock:
            out = list(self.queues.pop(base, ()))
            for scope in [s for s in self.held if s[0] == base]:
                out += self.held[scope]
                self.held[scope] = []
            return out

    def more(self) -> bool:
        """Tags that will come: waiting for a share of their registry, or held back."""
        with self.lock:
            return bool(self.held) or any(self.queues.values())
