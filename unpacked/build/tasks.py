"""doit task generators: offline, from the plan (recipes, resolved state, doit's records).

Per unique layer ``layer:<hex>``, per unique image config ``flat:<hex>``, per image
``image:<name>`` (metadata and public link), per platform of a multi-platform image
``platform:<name>#<os>/<arch>[/<variant>]`` (its ``.multiarch`` link), ``gc:<repo>``,
``publish:<repo>`` and ``thin:<name>``. ``_txn:<repo>`` opens the repository's transaction as
a setup task, so it runs only when some work is stale. Generation never touches the network,
so ``doit list``, ``info`` and ``forget`` work offline and fast. Up-to-date states are worked
out here, from the plan, rather than by callables doit would inspect one by one; ``doit
info`` gets objects that say in words why a task is (not) up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from functools import cached_property

from ..log import count
from ..repo.layout import FLAT, LAYERS, METADATA, hex_of, public_target
from . import actions, doit_private
from .context import Context
from .doit_private import task_name
from .plan import FlatPlan, ImagePlan, LayerPlan, multiarch_name, public_link, thin_targets


class Status:
    """An up-to-date answer with its reason (what ``doit info`` shows)."""

    def __init__(self, ok: bool, why: str):
        self.ok, self.why = ok, why

    def __call__(self, task, values) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.why


def _isfile(folder: str, name: str) -> bool:
    """``name`` in ``folder`` is a file (paths made by us: the plain join is enough; tens of
    thousands of them a run)."""
    try:
        return stat.S_ISREG(os.stat(f"{folder}/{name}").st_mode)
    except (OSError, ValueError):
        return False


def _folders(path: str) -> frozenset[str]:
    """The names of the folders in ``path`` (a symlink is not one; none when it is absent)."""
    try:
        with os.scandir(path) as entries:
            return frozenset(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return frozenset()


def layer_status(values: dict, digest: str, missing: str | None) -> tuple[bool, str]:
    """Up to date when doit recorded this digest *and* every target layer folder is there
    (``missing``: the first that is not)."""
    if not values:
        return False, "not recorded as ingested (new, or forgotten)"
    if values.get("digest") != digest:
        return False, "the recorded digest differs" if values.get("digest") \
            else f"failed last time: {values.get('failed', 'no value recorded')}"
    if missing:
        return False, f"layer folder {missing} missing"
    return True, "ingested"


def flat_status(values: dict, key: str, missing: str | None,
                forced: str | None) -> tuple[bool, str]:
    if forced:
        return False, forced
    if not values:
        return False, "not recorded as built (new, or forgotten)"
    if values.get("key") != key:
        return False, f"failed last time: {values['failed']}" if values.get("failed") \
            else "recorded for other layers, mode or sandbox version"
    if missing:
        return False, f"flat folder {missing} missing"
    return True, "built"


def link_status(values: dict, digest: str, checks: list[tuple[str, str, str]]) -> tuple[bool, str]:
    """Up to date when the public path points where the resolved state says."""
    if not values:
        return False, "not recorded as linked (new, or forgotten)"
    if values.get("manifest") != digest:
        return False, f"failed last time: {values['failed']}" if values.get("failed") \
            else f"recorded for {values.get('manifest')}, the tag now names {digest}"
    for public, target, metadata in checks:
        try:
            got = os.readlink(public)
        except OSError:
            return False, f"public path {public} missing"
        if got != target:
            return False, f"{public} points at {got}, not {target}"
        if not _isfile(metadata, "image.json"):
            return False, f"metadata {metadata} missing"
    return True, "linked"


def thin_status(values: dict, key: str) -> tuple[bool, str]:
    if key and values.get("key") == key:
        return True, "pushed"
    if values.get("failed"):
        return False, f"failed last time: {values['failed']}"
    return False, "not pushed in this form yet (new, changed, or forgotten)"


class TransactionClosed:
    """``publish`` has nothing to do unless this run opened the repository's transaction."""

    def __init__(self, ctx: Context, repo: str):
        self.ctx, self.repo = ctx, repo

    def __call__(self, task, values) -> bool:
        return not self.ctx.publisher(self.repo).is_open()

    def __repr__(self) -> str:
        return "no transaction open" if self(None, {}) else "a transaction is open"


class NothingDue:
    """``gc:<repo>`` is up to date when nothing is due for deletion (no transaction then)."""

    def __init__(self, ctx: Context, repo: str, settled=lambda: False):
        self.ctx, self.repo, self.why = ctx, repo, "not checked"
        self.settled = settled                # no task of this run changes the repository
        self.answer: bool | None = None       # worked out once (the group row asks too)

    def __call__(self, task, values) -> bool:
        from ..errors import UnpackedError
        from ..repo.gc import Clocks
        from .plan import collection, gc_wants
        if self.answer is not None:
            return self.answer
        s = self.ctx.settings
        # what the run worked out at its start holds while no task changed the repository
        known = self.ctx.collections.get(self.repo) if self.settled() else None
        try:
            result = known or collection(self.ctx, gc_wants(self.ctx, self.ctx.plan, self.repo),
                                         self.repo, Clocks(s.cache_dir, self.repo).load())
        except (OSError, UnpackedError) as exc:
            self.why = f"cannot plan: {exc}"
            return True
        self.why = (f"{len(result.due)} due, {len(result.pending)} pending, "
                    f"{len(result.waiting)} in their grace period")
        self.answer = not result.due and not result.blocked
        return self.answer

    def __repr__(self) -> str:
        return self.why


class _Unchecked(dict):
    """Every task's state when nobody asked for it."""

    def __missing__(self, key: str) -> tuple[bool, str]:
        return True, "not checked"


# the task generators, in the order they are written below (doit orders them by line)
KINDS = ("_txn", "layer", "flat", "platform", "image", "publish", "thin", "gc")

GROUPS = {      # the group rows: all ``doit list`` shows of the tasks below them
    "layer": "Download, verify and unpack one layer into .layers/<hex>.",
    "flat": "Merge an image's layers into .flat/<config hex>, an Apptainer sandbox.",
    "platform": "Point .multiarch/<arch>/<name> at one platform's flat image.",
    "image": "Write an image's metadata and point its public path at its flat image.",
    "thin": "Push thin images (thin.json naming CVMFS paths).",
    "publish": "Publish each repository's transaction.",
    "gc": "Delete unreferenced images, flat images and layers past their grace period.",
}


class Tasks:
    """The task generators of one run, bound to its context (``dodo.py`` exports them).

    Every task's up-to-date answer is worked out once, first; a task depends only on the
    tasks that are not up to date (``all_edges``: on all of them, for ``doit info`` and
    ``doit -a``). A no-op run so reaches nothing but publish, gc and thin from its default
    targets, and doit's scheduler never walks the tens of thousands of layers that are
    already there; they stay tasks (``doit list``, ``doit layer:<hex>``, ``doit forget``).
    """

    def __init__(self, ctx: Context, explain: bool = False, collect: bool = True,  # noqa: PLR0913
                 all_edges: bool = False, groups_only: bool = False, status: bool = True,
                 due_only: bool = False):
        self.ctx = ctx
        self.explain = explain          # doit info: up-to-date objects that say why
        self.collect = collect          # garbage collection is part of a bare run
        self.all_edges = all_edges or explain
        self.groups_only = groups_only  # a bare `doit list`: it shows the group rows alone
        self.status = status            # ... and their state only with -s
        # a bare run: tasks that are up to date are not made at all (no task of the run can
        # reach one, as none depends on them); their names are kept for doit's records
        self.due_only = due_only and not self.all_edges
        self.omitted: set[str] = set()
        self._roots: dict[str, str] = {}
        self._deps_of: dict[str, list[str]] = {}
        self._repo_lists: dict[tuple, list[str]] = {}
        self._setups: dict[tuple, list[str]] = {}
        self._made: dict[str, list] = {}
        self._areas: dict[tuple[str, str], str] = {}
        self._listed: dict[tuple[str, str], frozenset[str]] = {}

    def prepare(self, stale: Callable[[], bool] = lambda: False) -> None:
        """Work out every task's state now, and a bare run's tasks (a run does while its
        resolve waits: doit then only takes them). Once ``stale`` says the state changed,
        the tasks are not made (they will be, from the new state): the work would be lost."""
        if self.status:
            _ = self.busy_images
        if not self.due_only:
            return
        for kind in KINDS:
            if stale():
                self._made = {}
                return
            self._made[kind] = list(getattr(self, f"task_{kind}")())

    def namespace(self) -> dict:
        if self.groups_only:
            return {f"task_{name}": self._group_only(name, doc) for name, doc in GROUPS.items()}
        return {f"task_{kind}": self._creator(kind) for kind in KINDS}

    def _creator(self, kind: str):
        """The generator doit calls: the tasks ``prepare`` made (once), or made now."""
        method = getattr(self, f"task_{kind}")
        made = self._made.pop(kind, None)
        if made is None:
            return method

        def replay():
            yield from made
        replay.__doc__ = method.__doc__
        return replay

    def _group_only(self, kind: str, doc: str):
        """A generator of the group row alone (with its state when ``-s`` asks for it)."""
        def generate():
            if kind in ("publish", "gc"):     # their own checks (transaction, what is due)
                yield next(getattr(self, f"task_{kind}")()) if self.status \
                    else {"name": None, "doc": doc, "uptodate": [True]}
                return
            oks = [ok for task, (ok, _) in self.states.items() if task.startswith(kind + ":")] \
                if self.status else [True]
            yield self._group(doc, oks)
        generate.__doc__ = doc
        return generate

    def _omit(self, name: str, ok: bool) -> bool:
        """Leave out an up-to-date subtask of a bare run (remembering its name)."""
        if ok and self.due_only:
            self.omitted.add(name)
            return True
        return False

    def _uptodate(self, ok: bool, why: str) -> list:
        return [Status(ok, why)] if self.explain else [ok]

    def _tasks(self, kind: str, oks: list[bool], rows: list[dict]):
        """The group task ``kind`` and its subtasks. A bare run keeps no subtask's doc:
        only ``doit list``, ``info`` and ``help`` show one (~4 MiB at ten thousand images)."""
        if self.due_only:
            for row in rows:
                row.pop("doc", None)
        return doit_private.tasks_of(kind, self._group(GROUPS[kind], oks), rows)

    def _group(self, doc: str, states: list[bool]) -> dict:
        """The group row: up to date when every subtask is (``doit list --all -s``)."""
        return {"name": None, "doc": doc, "uptodate": [all(states)]}

    @staticmethod
    def _txn(repo: str) -> str:
        return task_name("_txn", repo)

    def _repos(self, repos) -> list[str]:
        """One sorted list per set of repositories, shared by every task of that set (an
        action only reads it; fifty thousand tasks name the same one or two)."""
        key = tuple(sorted(repos))
        shared = self._repo_lists.get(key)
        if shared is None:
            shared = self._repo_lists[key] = list(key)
        return shared

    def _setup(self, repos) -> list[str]:
        """The transactions a task of ``repos`` needs, one shared list per set (doit only
        reads a task's setup tasks)."""
        key = tuple(sorted(repos))
        shared = self._setups.get(key)
        if shared is None:
            shared = self._setups[key] = [self._txn(r) for r in key]
        return shared

    def _root(self, repo: str) -> str:
        root = self._roots.get(repo)
        if root is None:
            root = self._roots[repo] = str(self.ctx.settings.repo_root / repo)
        return root

    def _deps(self, names) -> list[str]:
        """The dependencies a task needs to wait for: those not up to date."""
        if self.all_edges:
            return list(names)
        states = self.states
        return [n for n in names if not states[n][0]]

    def _needs(self, name: str, deps: list[str]) -> bool:
        """Some work for ``name``: itself or a dependency is not up to date."""
        states = self.states
        return not states[name][0] or any(not states[d][0] for d in deps)

    # -- every task's up-to-date answer, once -------------------------------------------------

    @cached_property
    def by_name(self) -> dict[str, list[ImagePlan]]:
        return dict(sorted(self.ctx.plan.by_name().items()))

    @cached_property
    def converted(self) -> dict[str, list[ImagePlan]]:
        """Images that resolved (and whose public path is their own), by name."""
        plan = self.ctx.plan
        return {name: items for name, items in self.by_name.items()
                if items[0].resolved is not None and not items[0].failure
                and name not in plan.clashes}

    @cached_property
    def states(self) -> dict[str, tuple[bool, str]]:
        if not self.status:                 # `doit list --all`: states are not shown
            return _Unchecked()
        plan = self.ctx.plan
        recorded = plan.recorded
        states: dict[str, tuple[bool, str]] = {}
        for digest, entry in plan.layers.items():
            task = entry.task
            states[task] = layer_status(recorded.get(task, {}), digest,
                                        self._missing(entry.repos, LAYERS, entry.folder))
        for entry in plan.flats.values():
            task = entry.task
            states[task] = flat_status(recorded.get(task, {}), self._flat_key(entry),
                                       self._missing(entry.repos, FLAT, entry.folder),
                                       self._forced(entry))
            if not states[task][0]:
                self._whole_layers(entry, states)
        for name, items in self.converted.items():
            for task, _, checks, digest in self._platform_rows(name, items):
                states[task] = link_status(recorded.get(task, {}), digest, checks)
            checks, _ = self._image_checks(name, items)
            task = task_name("image", name)
            states[task] = link_status(recorded.get(task, {}), items[0].resolved.top_digest,
                                       checks)
            if any(i.recipe.output_format for i in items):
                task = task_name("thin", name)
                states[task] = thin_status(recorded.get(task, {}),
                                                  thin_targets(items, self.ctx.state)[1])
        for name in self.by_name:
            states.setdefault(task_name("image", name), (False, "not converted"))
        return states

    def _area(self, repo: str, area: str) -> str:
        """``<root>/<area>/``, made once per repository and area."""
        key = (repo, area)
        path = self._areas.get(key)
        if path is None:
            path = self._areas[key] = os.path.join(self._root(repo), area, "")
        return path

    def _missing(self, repos, area: str, name: str) -> str | None:
        """The first folder ``<area>/<name>`` of ``repos`` that is not there (None: all are).
        A layer or flat image is placed whole under its name (its record written inside
        first), so a folder there is a complete one: each area is listed once a run, not
        looked at once per layer (thirty thousand stats at ten thousand images)."""
        for repo in sorted(repos) if len(repos) > 1 else repos:
            listed = self._listed.get((repo, area))
            if listed is None:
                listed = self._listed[(repo, area)] = _folders(self._area(repo, area))
            if name not in listed:
                return self._area(repo, area) + name
        return None

    def _whole_layers(self, flat: FlatPlan, states: dict) -> None:
        """The layers a flat image about to be built reads are complete, not only there: a
        folder an operator half deleted keeps its name, and ``layer.json`` is written last
        (one look per layer of what is stale; a run with nothing to build makes none)."""
        layers = self.ctx.plan.layers
        for x in flat.image.layers:
            entry = layers[x.digest]
            if not states[entry.task][0]:
                continue
            for folder in self._layer_dirs(entry):
                if not _isfile(folder, "layer.json"):
                    states[entry.task] = (False, f"layer folder {folder} incomplete "
                                                 "(no layer.json)")
                    break

    def _layer_dirs(self, entry: LayerPlan) -> list[str]:
        return [self._area(r, LAYERS) + entry.folder for r in sorted(entry.repos)]

    def _flat_key(self, entry: FlatPlan) -> str:
        """What a flat image is built from: its layers, the flatten mode, the sandbox."""
        return hashlib.sha256(json.dumps([entry.config, [x.digest for x in entry.image.layers],
                                          self.ctx.settings.flatten_mode, 1]).encode()
                              ).hexdigest()

    def _flat_dirs(self, entry: FlatPlan) -> list[str]:
        return [self._area(r, FLAT) + entry.folder for r in sorted(entry.repos)]

    def _forced(self, flat: FlatPlan) -> str | None:
        """``doit forget image:X`` re-flattens X: its record gone, its link still there."""
        recorded = self.ctx.plan.recorded
        for item in flat.images:
            if task_name("image", item.name) not in recorded and \
                    os.path.islink(os.path.join(self._root(item.repo), item.public)):
                return f"image:{item.name} was forgotten: rebuilding its flat image"
        return None

    def _platform_rows(self, name: str, items: list[ImagePlan]):
        """(task name, image, link checks, manifest digest) of each platform's link."""
        if not items[0].multiarch:
            return
        repos = sorted({i.repo for i in items})
        for image in items[0].images:
            path = multiarch_name(image.arch, name)
            checks = [(os.path.join(self._root(r), path),
                       public_target(path, image.config_digest),
                       os.path.join(self._root(r), METADATA, path)) for r in repos]
            task = task_name("platform", f"{name}#{image.platform}")
            yield task, image, checks, image.manifest_digest

    def _image_checks(self, name: str, items: list[ImagePlan]):
        first = items[0]
        variant = self.ctx.settings.publisher == "cvmfs"
        checks, targets = [], []
        for item in items:
            root = self._root(item.repo)
            link = public_link(item.public, name, first.images[0], first.multiarch,
                               self.ctx.settings.cvmfs_arch, variant)
            checks.append((os.path.join(root, item.public), link,
                           os.path.join(root, METADATA, name)))
            targets.append((item.repo, item.public, item.input.written))
        return checks, targets

    def _image_deps(self, name: str, items: list[ImagePlan]) -> list[str]:
        deps = self._deps_of.get(name)
        if deps is None:
            images, plan = items[0].images, self.ctx.plan
            deps = [plan.flats[i.config_digest].task for i in images]
            deps += sorted({plan.layers[x.digest].task for i in images for x in i.layers})
            if items[0].multiarch:
                deps += [task_name("platform", f"{name}#{i.platform}") for i in images]
            self._deps_of[name] = deps
        return deps

    @cached_property
    def busy_images(self) -> set[str]:
        """Images with work to do (theirs or a dependency's): what publish and gc wait for."""
        return {name for name, items in self.converted.items()
                if self.all_edges
                or self._needs(task_name("image", name), self._image_deps(name, items))} \
            | {name for name in self.by_name if name not in self.converted}

    @property
    def idle_images(self) -> set[str]:
        """Converted images with no work at all: doit never visits them (unchanged)."""
        return set(self.converted) - self.busy_images

    # -- generators ---------------------------------------------------------------------------

    def task__txn(self):
        """Open a repository's transaction (a setup task: only when something is stale)."""
        for repo in self.ctx.plan.repos:
            yield {"name": repo, "actions": [(actions.begin, [self.ctx, repo])],
                   "doc": f"open the transaction of {repo}", "io": doit_private.NOT_CAPTURED}

    def task_layer(self):
        """Download, verify and unpack one layer into .layers/<hex>."""
        plan, states = self.ctx.plan, self.states
        rows, oks = [], []
        for digest, entry in sorted(plan.layers.items()):
            task = entry.task
            ok, why = states[task]
            oks.append(ok)
            if self._omit(task, ok):
                continue
            first = entry.sources[0][1]
            row = {"name": entry.folder,
                   "actions": [(actions.ingest, [self.ctx, entry.sources,
                                                 self._repos(entry.repos)])],
                   "uptodate": self._uptodate(ok, why),
                   "setup": self._setup(entry.repos),
                   "doc": f"{max(first.size, 0):,} bytes, used by "
                          f"{count(len(entry.images), 'image')}",
                   "verbosity": 2}
            if self.explain:
                row["meta"] = {"status": why, "digest": digest, "diff_id": first.diff_id,
                               "size": first.size, "media_type": first.media_type,
                               "images": entry.images[:20],
                               "folders": self._layer_dirs(entry)}
            rows.append(row)
        yield from self._tasks("layer", oks, rows)

    def task_flat(self):
        """Merge an image's layers into .flat/<config hex>, an Apptainer sandbox."""
        plan, states, s = self.ctx.plan, self.states, self.ctx.settings
        rows, oks = [], []
        for config, entry in sorted(plan.flats.items()):
            image, repos = entry.image, self._repos(entry.repos)
            task = entry.task
            ok, why = states[task]
            oks.append(ok)
            if self._omit(task, ok):
                continue
            key = self._flat_key(entry)
            row = {"name": entry.folder,
                   "actions": [(actions.flatten, [self.ctx, entry.name, config, repos, key])],
                   "task_dep": self._deps(plan.layers[x.digest].task for x in image.layers),
                   "uptodate": self._uptodate(ok, why),
                   "setup": self._setup(entry.repos),
                   "doc": f"{count(len(image.layers), 'layer')}, {image.platform}, "
                          f"{count(len(entry.images), 'image')}",
                   "verbosity": 2}
            if self.explain:
                row["meta"] = {"status": why, "config": config, "platform": image.platform,
                               "images": [i.name for i in entry.images][:20],
                               "layers": [x.digest for x in image.layers],
                               "folders": self._flat_dirs(entry), "mode": s.flatten_mode}
            rows.append(row)
        yield from self._tasks("flat", oks, rows)

    def task_platform(self):
        """Point .multiarch/<arch>/<name> at one platform's flat image (multi-platform images)."""
        states = self.states
        rows, oks = [], []
        for name, items in self.converted.items():
            repos = self._repos({i.repo for i in items})
            for task, image, _, digest in self._platform_rows(name, items):
                ok, why = states[task]
                oks.append(ok)
                if self._omit(task, ok):
                    continue
                rows.append({
                    "name": task.split(":", 1)[1],
                    "actions": [(actions.link_platform,
                                 [self.ctx, name, image.config_digest, repos])],
                    "task_dep": self._deps([self.ctx.plan.flats[image.config_digest].task]),
                    "uptodate": self._uptodate(ok, why),
                    "setup": self._setup(repos),
                    "doc": f"{multiarch_name(image.arch, name)} -> "
                           f".flat/{hex_of(image.config_digest)[:12]}",
                    "meta": {"status": why, "platform": image.platform, "manifest": digest,
                             "config": image.config_digest},
                    "verbosity": 2})
        yield from self._tasks("platform", oks, rows)

    def task_image(self):
        """Write an image's metadata and point its public path at its flat image."""
        plan = self.ctx.plan
        variant = self.ctx.settings.publisher == "cvmfs"
        rows, oks = [], []
        for name, items in self.by_name.items():
            first = items[0]
            meta = {"input": [i.input.written for i in items],
                    "recipe": [f"{i.recipe.path}:{i.input.line}" for i in items],
                    "repository": [i.repo for i in items],
                    "public_path": [i.public for i in items]} if self.explain else {}
            if name not in self.converted:
                reason = plan.clashes.get(name) or first.failure or \
                    f"{name}: not resolved yet (run doit)"
                action = actions.gone if self._gone(items) else actions.fail
                meta["failure"] = reason
                oks.append(False)
                rows.append({"name": name, "actions": [(action, [self.ctx, reason])],
                             "meta": meta, "doc": "failed: " + reason, "verbosity": 2})
                continue
            ok, why = self.states[task_name("image", name)]
            oks.append(ok)
            if self._omit(task_name("image", name), ok and name not in self.busy_images):
                continue
            _, targets = self._image_checks(name, items)
            row = {"name": name,
                   "actions": [(actions.link, [self.ctx, name, targets, variant])],
                   "task_dep": self._deps(self._image_deps(name, items)),
                   "uptodate": self._uptodate(ok, why),
                   "setup": self._setup({i.repo for i in items}),
                   "doc": f"{first.input.written} -> {', '.join(i.public for i in items)}",
                   "verbosity": 2}
            if self.explain:
                row["meta"] = dict(meta, status=why, tag_digest=first.resolved.top_digest,
                                   platforms=[i.platform for i in first.images],
                                   missing_platforms=list(first.resolved.missing),
                                   manifest=[i.manifest_digest for i in first.images],
                                   config=[i.config_digest for i in first.images])
            rows.append(row)
        yield from self._tasks("image", oks, rows)

    def _gone(self, items: list[ImagePlan]) -> bool:
        """Converted before, and now 404 upstream: served on, reported, not a failure."""
        return self.ctx.state.gone(items[0].name) and any(
            os.path.islink(os.path.join(self._root(i.repo), i.public)) for i in items)

    def _changing(self, repo: str) -> bool:
        """Some image of ``repo`` has work that writes to it in this run."""
        return any(name in self.busy_images for name, items in self.converted.items()
                   if any(i.repo == repo for i in items))

    def _repo_images(self, repo: str) -> list[str]:
        """The images of ``repo`` that publish and gc wait for."""
        return [task_name("image", name) for name, items in self.by_name.items()
                if name in self.busy_images and any(i.repo == repo for i in items)]

    def task_publish(self):
        """Publish each repository's transaction (nothing when the run changed nothing)."""
        plan = self.ctx.plan
        checks = [TransactionClosed(self.ctx, repo) for repo in plan.repos]
        yield {"name": None, "doc": GROUPS["publish"], "uptodate": checks}
        for repo, closed in zip(plan.repos, checks, strict=True):
            total = sum(1 for items in self.by_name.values() if any(i.repo == repo
                                                                    for i in items))
            gc_dep = [f"gc:{repo}"] if self.collect else []
            yield {"name": repo, "actions": [(actions.publish, [self.ctx, repo])],
                   "task_dep": self._repo_images(repo) + gc_dep,
                   "uptodate": [closed],
                   "doc": f"publish {repo} ({count(total, 'image')})", "verbosity": 2,
                   "io": doit_private.NOT_CAPTURED}

    def task_thin(self):
        """Push thin images (thin.json naming CVMFS paths) for recipes with output_format."""
        rows, oks = [], []
        for name, items in self.converted.items():
            if not any(i.recipe.output_format for i in items):
                continue
            targets, key = thin_targets(items, self.ctx.state)
            ok, why = self.states[task_name("thin", name)]
            oks.append(ok)
            if self._omit(task_name("thin", name), ok and name not in self.busy_images):
                continue
            image = [task_name("image", name)] if name in self.busy_images else []
            rows.append({"name": name,
                         "actions": [(actions.push_thin, [self.ctx, name, targets, key])],
                         "task_dep": sorted({f"publish:{i.repo}" for i in items}) + image,
                         "uptodate": self._uptodate(ok, why),
                         "doc": ", ".join(t[2] for t in targets),
                         "meta": {"status": why, "output": [t[2] for t in targets],
                                  "images": [name]},
                         "verbosity": 2})
        yield from self._tasks("thin", oks, rows)

    def task_gc(self):
        """Delete unreferenced images, flat images and layers past their grace period."""
        plan, s = self.ctx.plan, self.ctx.settings
        checks = [NothingDue(self.ctx, repo, lambda r=repo: not self._changing(r))
                  for repo in plan.repos]
        yield {"name": None, "doc": GROUPS["gc"], "uptodate": checks}
        for repo, due in zip(plan.repos, checks, strict=True):
            yield {"name": repo, "actions": [(actions.collect, [self.ctx, repo])],
                   "task_dep": self._repo_images(repo),
                   "uptodate": [due], "setup": [self._txn(repo)],
                   "doc": f"garbage collection of {repo} (grace {s.gc_grace:g} days, at most "
                          f"{s.gc_max_deletions} deletions a run)", "verbosity": 2,
                   "io": doit_private.NOT_CAPTURED}
