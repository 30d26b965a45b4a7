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

from ..log import count
from ..repo.layout import FLAT, LAYERS, METADATA, hex_of, public_target
from . import actions
from .context import Context
from .plan import FlatPlan, ImagePlan, multiarch_name, public_link, thin_targets


class Status:
    """An up-to-date answer with its reason (what ``doit info`` shows)."""

    def __init__(self, ok: bool, why: str):
        self.ok, self.why = ok, why

    def __call__(self, task, values) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.why


def _isfile(*parts: str) -> bool:
    return os.path.isfile(os.path.join(*parts))


def layer_status(values: dict, digest: str, dirs: list[str]) -> tuple[bool, str]:
    """Up to date when doit recorded this digest *and* every target layer folder is complete."""
    if not values:
        return False, "not recorded as ingested (new, or forgotten)"
    if values.get("digest") != digest:
        return False, "the recorded digest differs" if values.get("digest") \
            else f"failed last time: {values.get('failed', 'no value recorded')}"
    for d in dirs:
        if not _isfile(d, "layer.json"):       # written last, in a folder placed whole
            return False, f"layer folder {d} missing"
    return True, "ingested"


def flat_status(values: dict, key: str, dirs: list[str], forced: str | None) -> tuple[bool, str]:
    if forced:
        return False, forced
    if not values:
        return False, "not recorded as built (new, or forgotten)"
    if values.get("key") != key:
        return False, f"failed last time: {values['failed']}" if values.get("failed") \
            else "recorded for other layers, mode or sandbox version"
    for d in dirs:
        if not os.path.isdir(d):
            return False, f"flat folder {d} missing"
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
    if values.get("key") == key:
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

    def __init__(self, ctx: Context, repo: str):
        self.ctx, self.repo, self.why = ctx, repo, "not checked"
        self.answer: bool | None = None       # worked out once (the group row asks too)

    def __call__(self, task, values) -> bool:
        from ..errors import UnpackedError
        from ..repo.gc import Clocks
        from .plan import collection
        if self.answer is not None:
            return self.answer
        try:
            clocks = Clocks(self.ctx.settings.cache_dir, self.repo).load()
            result = collection(self.ctx, self.ctx.plan, self.repo, clocks)
        except (OSError, UnpackedError) as exc:
            self.why = f"cannot plan: {exc}"
            return True
        self.why = (f"{len(result.due)} due, {len(result.pending)} pending, "
                    f"{len(result.waiting)} in their grace period")
        self.answer = not result.due and not result.blocked
        return self.answer

    def __repr__(self) -> str:
        return self.why


class Tasks:
    """The task generators of one run, bound to its context (``dodo.py`` exports them)."""

    def __init__(self, ctx: Context, explain: bool = False, collect: bool = True):
        self.ctx = ctx
        self.explain = explain          # doit info: up-to-date objects that say why
        self.collect = collect          # garbage collection is part of a bare run

    def namespace(self) -> dict:
        return {f"task_{name}": getattr(self, f"task_{name}")
                for name in ("_txn", "layer", "flat", "platform", "image", "gc", "publish",
                             "thin")}

    def _uptodate(self, ok: bool, why: str) -> list:
        return [Status(ok, why)] if self.explain else [ok]

    def _group(self, doc: str, states: list[bool]) -> dict:
        """The group row: up to date when every subtask is (``doit list --all -s``)."""
        return {"name": None, "doc": doc, "uptodate": [all(states)]}

    @staticmethod
    def _txn(repo: str) -> str:
        return f"_txn:{repo}"

    def _root(self, repo: str) -> str:
        return str(self.ctx.settings.repo_root / repo)

    # -- generators ---------------------------------------------------------------------------

    def task__txn(self):
        """Open a repository's transaction (a setup task: only when something is stale)."""
        for repo in self.ctx.plan.repos:
            yield {"name": repo, "actions": [(actions.begin, [self.ctx, repo])],
                   "doc": f"open the transaction of {repo}"}

    def task_layer(self):
        """Download, verify and unpack one layer into .layers/<hex>."""
        plan = self.ctx.plan
        rows, states = [], []
        for digest, entry in sorted(plan.layers.items()):
            repos = sorted(entry.repos)
            dirs = [os.path.join(self._root(r), LAYERS, hex_of(digest)) for r in repos]
            ok, why = layer_status(plan.recorded.get(f"layer:{hex_of(digest)}", {}), digest, dirs)
            states.append(ok)
            first = entry.sources[0][1]
            sources = [(ref.url, {**vars(layer), "urls": list(layer.urls)})
                       for ref, layer in entry.sources[:8]]
            rows.append({
                "name": hex_of(digest),
                "actions": [(actions.ingest, [self.ctx, sources, repos])],
                "uptodate": self._uptodate(ok, why),
                "setup": [self._txn(r) for r in repos],
                "doc": f"{max(first.size, 0):,} bytes, used by {count(len(entry.images), 'image')}",
                "meta": {"status": why, "digest": digest, "diff_id": first.diff_id,
                         "size": first.size, "media_type": first.media_type,
                         "images": entry.images[:20], "folders": dirs},
                "verbosity": 2})
        yield self._group("Download, verify and unpack one layer into .layers/<hex>.", states)
        yield from rows

    def _forced(self, flat: FlatPlan) -> str | None:
        """``doit forget image:X`` re-flattens X: its record gone, its link still there."""
        recorded = self.ctx.plan.recorded
        for item in flat.images:
            if f"image:{item.name}" not in recorded and \
                    os.path.islink(os.path.join(self._root(item.repo), item.public)):
                return f"image:{item.name} was forgotten: rebuilding its flat image"
        return None

    def task_flat(self):
        """Merge an image's layers into .flat/<config hex>, an Apptainer sandbox."""
        plan, s = self.ctx.plan, self.ctx.settings
        rows, states = [], []
        for config, entry in sorted(plan.flats.items()):
            image, repos = entry.image, sorted(entry.repos)
            key = hashlib.sha256(json.dumps([config, [x.digest for x in image.layers],
                                             s.flatten_mode, 1]).encode()).hexdigest()
            dirs = [os.path.join(self._root(r), FLAT, hex_of(config)) for r in repos]
            ok, why = flat_status(plan.recorded.get(f"flat:{hex_of(config)}", {}), key, dirs,
                                  self._forced(entry))
            states.append(ok)
            rows.append({
                "name": hex_of(config),
                "actions": [(actions.flatten, [self.ctx, entry.name, config, repos, key])],
                "task_dep": [f"layer:{hex_of(x.digest)}" for x in image.layers],
                "uptodate": self._uptodate(ok, why),
                "setup": [self._txn(r) for r in repos],
                "doc": f"{count(len(image.layers), 'layer')}, {image.platform}, "
                       f"{count(len(entry.images), 'image')}",
                "meta": {"status": why, "config": config, "platform": image.platform,
                         "images": [i.name for i in entry.images][:20],
                         "layers": [x.digest for x in image.layers], "folders": dirs,
                         "mode": s.flatten_mode},
                "verbosity": 2})
        yield self._group("Merge an image's layers into .flat/<config hex>, an Apptainer "
                          "sandbox.", states)
        yield from rows

    def _converted(self) -> dict[str, list[ImagePlan]]:
        """Images that resolved (and whose public path is their own), by name."""
        plan = self.ctx.plan
        return {name: items for name, items in sorted(plan.by_name().items())
                if items[0].resolved is not None and not items[0].failure
                and name not in plan.clashes}

    def task_platform(self):
        """Point .multiarch/<arch>/<name> at one platform's flat image (multi-platform images)."""
        plan = self.ctx.plan
        rows, states = [], []
        for name, items in self._converted().items():
            if not items[0].multiarch:
                continue
            repos = sorted({i.repo for i in items})
            for image in items[0].images:
                path = multiarch_name(image.arch, name)
                checks = [(os.path.join(self._root(r), path),
                           public_target(path, image.config_digest),
                           os.path.join(self._root(r), METADATA, path)) for r in repos]
                task = f"{name}#{image.platform}"
                ok, why = link_status(plan.recorded.get(f"platform:{task}", {}),
                                      image.manifest_digest, checks)
                states.append(ok)
                rows.append({
                    "name": task,
                    "actions": [(actions.link_platform,
                                 [self.ctx, name, image.config_digest, repos])],
                    "task_dep": [f"flat:{hex_of(image.config_digest)}"],
                    "uptodate": self._uptodate(ok, why),
                    "setup": [self._txn(r) for r in repos],
                    "doc": f"{path} -> .flat/{hex_of(image.config_digest)[:12]}",
                    "meta": {"status": why, "platform": image.platform,
                             "manifest": image.manifest_digest, "config": image.config_digest},
                    "verbosity": 2})
        yield self._group("Point .multiarch/<arch>/<name> at one platform's flat image.",
                          states)
        yield from rows

    def task_image(self):
        """Write an image's metadata and point its public path at its flat image."""
        plan = self.ctx.plan
        variant = self.ctx.settings.publisher == "cvmfs"
        rows, states = [], []
        converted = self._converted()
        for name, items in sorted(plan.by_name().items()):
            first = items[0]
            meta = {"input": [i.input.written for i in items],
                    "recipe": [f"{i.recipe.path}:{i.input.line}" for i in items],
                    "repository": [i.repo for i in items],
                    "public_path": [i.public for i in items]}
            if name not in converted:
                reason = plan.clashes.get(name) or first.failure or \
                    f"{name}: not resolved yet (run doit)"
                action = actions.gone if self._gone(items) else actions.fail
                meta["failure"] = reason
                states.append(False)
                rows.append({"name": name, "actions": [(action, [self.ctx, reason])],
                             "meta": meta, "doc": "failed: " + reason, "verbosity": 2})
                continue
            rows.append(self._image_row(name, items, meta, variant, states))
        yield self._group("Write an image's metadata and point its public path at its flat "
                          "image.", states)
        yield from rows

    def _gone(self, items: list[ImagePlan]) -> bool:
        """Converted before, and now 404 upstream: served on, reported, not a failure."""
        return self.ctx.state.gone(items[0].name) and any(
            os.path.islink(os.path.join(self._root(i.repo), i.public)) for i in items)

    def _image_row(self, name: str, items: list[ImagePlan], meta: dict, variant: bool,
                   states: list[bool]) -> dict:
        first, plan = items[0], self.ctx.plan
        images = first.images
        checks, targets = [], []
        for item in items:
            root = self._root(item.repo)
            link = public_link(item.public, name, images[0], first.multiarch,
                               self.ctx.settings.cvmfs_arch, variant)
            checks.append((os.path.join(root, item.public), link,
                           os.path.join(root, METADATA, name)))
            targets.append((item.repo, item.public, item.input.written))
        ok, why = link_status(plan.recorded.get(f"image:{name}", {}),
                              first.resolved.top_digest, checks)
        states.append(ok)
        deps = [f"flat:{hex_of(i.config_digest)}" for i in images]
        deps += sorted({f"layer:{hex_of(x.digest)}" for i in images for x in i.layers})
        if first.multiarch:
            deps += [f"platform:{name}#{i.platform}" for i in images]
        meta.update({"status": why, "tag_digest": first.resolved.top_digest,
                     "platforms": [i.platform for i in images],
                     "missing_platforms": list(first.resolved.missing),
                     "manifest": [i.manifest_digest for i in images],
                     "config": [i.config_digest for i in images]})
        return {"name": name,
                "actions": [(actions.link, [self.ctx, name, targets, variant])],
                "task_dep": deps,
                "uptodate": self._uptodate(ok, why),
                "setup": sorted({self._txn(i.repo) for i in items}),
                "doc": f"{first.input.written} -> {', '.join(i.public for i in items)}",
                "meta": meta, "verbosity": 2}

    def task_publish(self):
        """Publish each repository's transaction (nothing when the run changed nothing)."""
        plan = self.ctx.plan
        checks = [TransactionClosed(self.ctx, repo) for repo in plan.repos]
        yield {"name": None, "doc": "Publish each repository's transaction.",
               "uptodate": checks}
        for repo, closed in zip(plan.repos, checks, strict=True):
            names = sorted({i.name for i in plan.images if i.repo == repo})
            gc_dep = [f"gc:{repo}"] if self.collect else []
            yield {"name": repo, "actions": [(actions.publish, [self.ctx, repo])],
                   "task_dep": [f"image:{n}" for n in names] + gc_dep,
                   "uptodate": [closed],
                   "doc": f"publish {repo} ({count(len(names), 'image')})", "verbosity": 2}

    def task_thin(self):
        """Push thin images (thin.json naming CVMFS paths) for recipes with output_format."""
        plan = self.ctx.plan
        rows, states = [], []
        for name, items in self._converted().items():
            if not any(i.recipe.output_format for i in items):
                continue
            targets, key = thin_targets(items)
            ok, why = thin_status(plan.recorded.get(f"thin:{name}", {}), key)
            states.append(ok)
            rows.append({"name": name,
                         "actions": [(actions.push_thin, [self.ctx, name, targets, key])],
                         "task_dep": sorted({f"publish:{i.repo}" for i in items})
                         + [f"image:{name}"],
                         "uptodate": self._uptodate(ok, why),
                         "doc": ", ".join(t[2] for t in targets),
                         "meta": {"status": why, "output": [t[2] for t in targets],
                                  "images": [name]},
                         "verbosity": 2})
        yield self._group("Push thin images (thin.json naming CVMFS paths).", states)
        yield from rows

    def task_gc(self):
        """Delete unreferenced images, flat images and layers past their grace period."""
        plan, s = self.ctx.plan, self.ctx.settings
        checks = [NothingDue(self.ctx, repo) for repo in plan.repos]
        yield {"name": None, "doc": "Delete unreferenced images, flat images and layers past "
               "their grace period.", "uptodate": checks}
        for repo, due in zip(plan.repos, checks, strict=True):
            names = sorted({i.name for i in plan.images if i.repo == repo})
            yield {"name": repo, "actions": [(actions.collect, [self.ctx, repo])],
                   "task_dep": [f"image:{n}" for n in names],
                   "uptodate": [due], "setup": [self._txn(repo)],
                   "doc": f"garbage collection of {repo} (grace {s.gc_grace:g} days, at most "
                          f"{s.gc_max_deletions} deletions a run)", "verbosity": 2}
