"""doit task generators and actions: offline, from the recipes and the resolved state.

Per unique layer ``layer:<hex>``, per unique image config ``flat:<hex>``, per image
``image:<name>`` (metadata and public link), and ``publish:<repo>``. ``_txn:<repo>`` opens the
repository's transaction as a setup task, so it runs only when some work is stale.
Generation never touches the network, so ``doit list``/``info``/``forget`` work offline and
fast; a ``doit`` run resolves first (``prepare_run`` in doit_ext), then generates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from doit import get_var

from . import recipe as recipes
from . import settings as settings_mod
from .context import context
from .errors import Unauthorized, UnpackedError
from .recipe import Input, Recipe
from .reference import ImageRef
from .repository import public_target
from .resolve import expand
from .resolved import Resolved
from .settings import Settings

log = logging.getLogger(__name__)
SANDBOX_VERSION = 1          # bump when the sandbox files change: every flat image is rebuilt


# -- settings and the plan --------------------------------------------------------------------

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


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


# -- up-to-date checks (run in doit's main process: cheap, offline, never raising) --------------

def layer_status(values: dict, digest: str, dirs: list[str]) -> tuple[bool, str]:
    """Up to date when doit recorded this digest *and* every target layer folder is complete."""
    if values.get("digest") != digest:
        return False, "not recorded as ingested (new, or forgotten)"
    for d in dirs:
        # layer.json is written last inside a folder renamed into place whole
        if not os.path.isfile(os.path.join(d, "layer.json")):
            return False, f"{d} is missing"
    return True, "ingested"


def flat_status(values: dict, key: str, dirs: list[str], forced: str | None) -> tuple[bool, str]:
    """Up to date when built from these layers in this mode and present; forced after a forget."""
    if forced:
        return False, forced
    if values.get("key") != key:
        return False, "not recorded as built from these layers (new, or forgotten)"
    for d in dirs:
        if not os.path.isdir(d):
            return False, f"{d} is missing"
    return True, "built"


def image_status(values: dict, manifest: str, checks: list[tuple[str, str, str]]
                 ) -> tuple[bool, str]:
    """Up to date when the public path points at the flat image of the resolved manifest."""
    if values.get("manifest") != manifest:
        return False, f"not recorded as linked to {manifest} (new, moved, or forgotten)"
    for link, target, metadata in checks:
        try:
            got = os.readlink(link)
        except OSError:
            return False, f"{link} is missing"
        if got != target:
            return False, f"{link} points at {got}, not {target}"
        if not os.path.isfile(os.path.join(metadata, "image.json")):
            return False, f"{metadata} is missing"
    return True, "linked"


def thin_status(values: dict, key: str) -> tuple[bool, str]:
    """Up to date when this exact thin image (same bytes, same destination) was pushed."""
    if values.get("key") == key:
        return True, "pushed"
    return False, "not pushed in this form yet (new, changed, or forgotten)"


class TransactionClosed:
    """``publish`` has nothing to do unless this run opened the repository's transaction."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, task, values) -> bool:
        return not os.path.exists(self.marker)

    def __repr__(self) -> str:
        return "TransactionClosed(no transaction open)" if self(None, {}) else \
            "TransactionClosed(a transaction is open)"


# -- actions (module level: picklable for doit -n N) --------------------------------------------

def _failed(exc: UnpackedError) -> dict:
    """A failure that is the image's, not the run's: recorded as a value, so that doit goes
    on to ``publish`` (what succeeded is published) while the reporter counts it as failed.
    Every up-to-date check asks for the value of a success, so the task runs again next time.
    """
    log.error("%s", exc)
    return {"failed": str(exc)}


def run_resolve(s: Settings) -> dict:
    """Resolve every input over the network; failures are kept per image for its task."""
    from .resolve import Resolver
    ctx = context(s)
    started = time.monotonic()
    resolver = Resolver(ctx.client, ctx.state, s.platform, s.registry_jobs)
    outcomes, problems = resolver.run(load_recipes(s))
    for line in problems:
        log.warning("%s", line)
    failed = [o for o in outcomes if o.error]
    for o in failed:
        log.warning("%s", o.error)
    changed = sum(1 for o in outcomes if o.changed)
    log.info("resolved %d images in %.1fs: %d changed, %d failed", len(outcomes),
             time.monotonic() - started, changed, len(failed))
    return {"images": len(outcomes), "changed": changed, "failed": len(failed),
            "problems": problems}


def begin_transaction(s: Settings, repo: str) -> dict:
    try:
        context(s).publisher(repo).begin()
    except UnpackedError as exc:
        return _failed(exc)
    return {}


def ingest(s: Settings, layer: dict, ref_text: str, repos: list[str]) -> dict:
    from .convert import ingest_layer
    from .reference import parse
    from .resolved import Layer
    ctx = context(s)
    item = Layer(**layer)
    try:
        for repo in repos:
            repository = ctx.publisher(repo).repository()
            ingest_layer(ctx.client, parse(ref_text), item, repository,
                         foreign=s.foreign_layers, max_bytes=s.max_layer_bytes)
    except UnpackedError as exc:
        return _failed(exc)
    return {"digest": item.digest}


def flatten(s: Settings, name: str, repos: list[str], key: str) -> dict:
    from .convert import build_flat
    ctx = context(s)
    resolved = ctx.state.resolved(name, s.platform)
    try:
        if resolved is None:
            raise UnpackedError(f"{name}: no resolved state in the cache; run doit again")
        for repo in repos:
            publisher = ctx.publisher(repo)
            mode = "copy" if publisher.kind == "cvmfs" or s.flatten == "copy" else "hardlink"
            build_flat(publisher.repository(), resolved, mode)
    except UnpackedError as exc:
        return _failed(exc)
    return {"key": key}


def link(s: Settings, name: str, targets: list[tuple[str, str, str]]) -> dict:
    """Write metadata and flip the public link in each ``(repo, public path, input)``."""
    from .convert import link_image
    ctx = context(s)
    resolved = ctx.state.resolved(name, s.platform)
    changes = []
    try:
        if resolved is None:
            raise UnpackedError(f"{name}: no resolved state in the cache; run doit again")
        for repo, public, written in targets:
            repository = ctx.publisher(repo).repository()
            before = repository.link_target(public)
            moved = link_image(repository, resolved, written, public)
            change = "added" if before is None else "updated" if moved else "rewritten"
            note_change(s, repo, f"{change} {name}")
            log.info("%s %s -> .flat/%s", change, public, resolved.config_digest[7:19])
            changes.append(change)
    except UnpackedError as exc:
        return _failed(exc)
    return {"manifest": resolved.manifest_digest, "change": changes[0] if changes else ""}


def fail(reason: str) -> dict:
    """The task of an image that could not be resolved: fails with the registry's reason."""
    return {"failed": reason}


def push_thin(s: Settings, name: str, targets: list[tuple[str, str, str, str | None]],
              key: str) -> dict:
    """Push the thin image of ``name`` for each ``(repo, origin, output, user)``."""
    from . import thin
    from .reference import parse
    ctx = context(s)
    resolved = ctx.state.resolved(name, s.platform)
    pushed = []
    try:
        if resolved is None:
            raise UnpackedError(f"{name}: no resolved state in the cache; run doit again")
        for repo, origin, output, user in targets:
            publisher = ctx.publisher(repo)
            if publisher.is_open():
                raise UnpackedError(f"{name}: {repo} is not published yet; thin image not "
                                    "pushed (it would name paths clients cannot see)")
            repository = publisher.repository()
            missing = [x.digest for x in resolved.layers if not repository.has_layer(x.digest)]
            if missing:
                raise UnpackedError(f"{name}: layers missing in {repo}: {', '.join(missing)}")
            out = parse(output)
            if out.api_host in ctx.denied:
                raise UnpackedError(ctx.denied[out.api_host])
            image = thin.build(origin, repo, resolved)
            home = ctx.state.blob_home(out.api_host, thin.sha(image.layer))
            mount = home if home and home != out.repository else None
            try:
                thin.push(ctx.pusher(user), out, image, mount)
            except Unauthorized as exc:
                who = f"user {user} with {thin.PASSWORD_ENV}" if user and thin.password() \
                    else "the Docker config's credentials, or none"
                ctx.denied[out.api_host] = (f"unauthorized for {out.registry}: pushing thin "
                                            f"images as {who} was refused ({exc.status} "
                                            f"{exc.code or ''})".replace(" )", ")"))
                raise UnpackedError(ctx.denied[out.api_host]) from None
            for blob in (image.layer, image.config):
                ctx.state.put_blob_home(out.api_host, thin.sha(blob), out.repository)
            log.info("pushed thin image %s (%s)", output, image.digest[7:19])
            pushed.append(output)
    except UnpackedError as exc:
        return _failed(exc)
    return {"key": key, "pushed": pushed}


def publish_repo(s: Settings, repo: str) -> dict:
    publisher = context(s).publisher(repo)
    try:
        publisher.publish(run_message(s, repo))
    except UnpackedError as exc:
        return _failed(exc)
    return {"errors": publisher.leftovers}


def _changes_file(s: Settings, repo: str) -> Path:
    return s.cache_dir / "transactions" / f"{repo}.changes"


def note_change(s: Settings, repo: str, line: str) -> None:
    path = _changes_file(s, repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def run_message(s: Settings, repo: str) -> str:
    """The publish message: what this run changed, in a line."""
    path = _changes_file(s, repo)
    try:
        lines = path.read_text().splitlines()
        path.unlink()
    except FileNotFoundError:
        lines = []
    shown = ", ".join(lines[:5]) + (f", +{len(lines) - 5} more" if len(lines) > 5 else "")
    return f"unpacked: {len(lines)} image(s) changed" + (f": {shown}" if lines else "")


# -- generators ---------------------------------------------------------------------------------

def _txn(repo: str) -> str:
    return f"_txn:{repo}"


def task__txn():
    """Open a repository's transaction (a setup task: only when something is stale)."""
    s = current_settings()
    for repo in sorted({r.cvmfs_repo for r in _recipes_or_none(s)}):
        yield {"name": repo, "actions": [(begin_transaction, [s, repo])],
               "doc": f"open the transaction of {repo}"}


def _recipes_or_none(s: Settings) -> list[Recipe]:
    try:
        return load_recipes(s)
    except UnpackedError:
        return []


def task_layer():
    """Download, verify and unpack one layer into .layers/<hex>."""
    plan = current_plan()
    s = plan.settings
    roots = {r: os.path.join(s.repo_root, r, ".layers") for r in plan.repos}
    for digest, entry in sorted(plan.layers.items()):
        repos = sorted(entry["repos"])
        dirs = [os.path.join(roots[r], _hex(digest)) for r in repos]
        layer = entry["layer"]
        ok, why = layer_status(plan.recorded.get(f"layer:{_hex(digest)}", {}), digest, dirs)
        yield {"name": _hex(digest),
               "actions": [(ingest, [s, vars(layer), entry["ref"].url, repos])],
               "uptodate": [ok],
               "setup": [_txn(r) for r in repos],
               "doc": f"{max(layer.size, 0):,} bytes, used by {len(entry['images'])} image(s)",
               "meta": {"status": why, "digest": digest, "diff_id": layer.diff_id,
                        "size": layer.size,
                        "media_type": layer.media_type, "images": entry["images"][:20],
                        "folders": dirs},
               "verbosity": 2}


def task_flat():
    """Merge an image's layers into .flat/<config hex>, an Apptainer sandbox."""
    plan = current_plan()
    s = plan.settings
    for config, entry in sorted(plan.flats.items()):
        resolved: Resolved = entry["resolved"]
        repos = sorted(entry["repos"])
        mode = "copy" if s.publisher == "cvmfs" or s.flatten == "copy" else "hardlink"
        key = hashlib.sha256(json.dumps([config, [x.digest for x in resolved.layers], mode,
                                         SANDBOX_VERSION]).encode()).hexdigest()
        dirs = [str(s.repo_root / r / ".flat" / _hex(config)) for r in repos]
        forced = None
        for item in entry["images"]:
            if f"image:{item.name}" not in plan.recorded and \
                    Path(s.repo_root / item.repo / item.public).is_symlink():
                forced = f"image:{item.name} was forgotten: rebuilding its flat image"
                break
        ok, why = flat_status(plan.recorded.get(f"flat:{_hex(config)}", {}), key, dirs, forced)
        yield {"name": _hex(config),
               "actions": [(flatten, [s, entry["name"], repos, key])],
               "task_dep": [f"layer:{_hex(x.digest)}" for x in resolved.layers],
               "uptodate": [ok],
               "setup": [_txn(r) for r in repos],
               "doc": f"{len(resolved.layers)} layers, {len(entry['images'])} image(s)",
               "meta": {"status": why, "config": config,
                        "images": [i.name for i in entry["images"]][:20],
                        "layers": [x.digest for x in resolved.layers], "folders": dirs,
                        "mode": mode},
               "verbosity": 2}


def task_image():
    """Write an image's metadata and point its public path at its flat image."""
    plan = current_plan()
    s = plan.settings
    by_name: dict[str, list[ImagePlan]] = {}
    for item in plan.images:
        by_name.setdefault(item.name, []).append(item)
    for name, items in sorted(by_name.items()):
        first = items[0]
        meta = {"input": [i.input.written for i in items],
                "recipe": [f"{i.recipe.path}:{i.input.line}" for i in items],
                "repository": [i.repo for i in items], "public_path": [i.public for i in items]}
        if first.failure or first.resolved is None:
            reason = first.failure or f"{name}: not resolved yet (run doit)"
            meta["failure"] = reason
            yield {"name": name, "actions": [(fail, [reason])], "meta": meta,
                   "doc": "failed to resolve: " + reason, "verbosity": 2}
            continue
        resolved = first.resolved
        targets, checks = [], []
        for item in items:
            root = s.repo_root / item.repo
            wanted = public_target(item.public, resolved.config_digest)
            checks.append((str(root / item.public), wanted,
                           str(root / ".metadata" / name)))
            targets.append((item.repo, item.public, item.input.written))
        ok, why = image_status(plan.recorded.get(f"image:{name}", {}), resolved.manifest_digest,
                               checks)
        meta.update({"status": why, "tag_digest": resolved.top_digest,
                     "manifest": resolved.manifest_digest, "config": resolved.config_digest,
                     "platform": resolved.platform, "layers": [x.digest for x in resolved.layers]})
        yield {"name": name,
               "actions": [(link, [s, name, targets])],
               "task_dep": [f"flat:{_hex(resolved.config_digest)}"],
               "uptodate": [ok],
               "setup": sorted({_txn(i.repo) for i in items}),
               "doc": f"{first.input.written} -> {', '.join(i.public for i in items)}",
               "meta": meta, "verbosity": 2}


def task_publish():
    """Publish each repository's transaction (nothing when the run changed nothing)."""
    plan = current_plan()
    s = plan.settings
    for repo in plan.repos:
        names = sorted({i.name for i in plan.images if i.repo == repo})
        marker = s.cache_dir / "transactions" / f"{repo}.json"
        gc_dep = [f"gc:{repo}"] if s.gc else []
        yield {"name": repo, "actions": [(publish_repo, [s, repo])],
               "task_dep": [f"image:{n}" for n in names] + gc_dep,
               "uptodate": [TransactionClosed(str(marker))],
               "doc": f"publish {repo} ({len(names)} images)", "verbosity": 2}


def thin_targets(items: list[ImagePlan]) -> tuple[list[tuple], str]:
    """Where an image's thin images go, and the key that says they are pushed as they are."""
    from . import thin
    resolved = items[0].resolved
    targets = [(i.repo, i.input.written, i.recipe.output_of(i.ref), i.recipe.user)
               for i in items if i.recipe.output_format]
    key = hashlib.sha256(json.dumps(
        [thin.key(origin, repo, output, resolved) for repo, origin, output, _ in targets]
    ).encode()).hexdigest()
    return targets, key


def task_thin():
    """Push thin images (thin.json naming CVMFS paths) for recipes with output_format."""
    plan = current_plan()
    s = plan.settings
    by_name: dict[str, list[ImagePlan]] = {}
    for item in plan.images:
        if item.recipe.output_format and item.resolved is not None and not item.failure:
            by_name.setdefault(item.name, []).append(item)
    for name, items in sorted(by_name.items()):
        targets, key = thin_targets(items)
        ok, why = thin_status(plan.recorded.get(f"thin:{name}", {}), key)
        yield {"name": name,
               "actions": [(push_thin, [s, name, targets, key])],
               "task_dep": sorted({f"publish:{i.repo}" for i in items}) + [f"image:{name}"],
               "uptodate": [ok],
               "doc": ", ".join(t[2] for t in targets),
               "meta": {"status": why, "output": [t[2] for t in targets], "images": [name]},
               "verbosity": 2}


# -- garbage collection -------------------------------------------------------------------------

def gc_wants(plan: Plan, repo: str):
    """What the recipes want kept in ``repo``, from the plan (offline)."""
    from . import gc
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
    from . import gc
    s = plan.settings
    clocks_file = gc.Clocks(s.cache_dir, repo)
    clocks = clocks_file.load()
    result = gc.compute(context(s).publisher(repo).repository(), repo, gc_wants(plan, repo),
                        clocks, s.clock(), s.gc_grace, s.gc_image_grace, s.gc_max_deletions,
                        s.gc_prune_gone)
    if save:
        clocks_file.save(clocks)
    return result


class NothingDue:
    """``gc:<repo>`` is up to date when nothing is due for deletion (no transaction then)."""

    def __init__(self, repo: str):
        self.repo, self.why = repo, "not checked"

    def __call__(self, task, values) -> bool:
        try:
            result = gc_plan(current_plan(), self.repo, save=False)
        except (OSError, UnpackedError) as exc:
            self.why = f"cannot plan: {exc}"
            return True
        self.why = (f"{len(result.due)} due, {len(result.pending)} pending, "
                    f"{len(result.waiting)} in their grace period")
        return not result.due

    def __repr__(self) -> str:
        return f"NothingDue({self.why})"


def run_gc(s: Settings, repo: str) -> dict:
    """Delete what is due (oldest first, at most gc_max_deletions) inside the transaction."""
    from . import gc
    plan = current_plan()
    result = gc_plan(plan, repo, save=False)
    repository = context(s).publisher(repo).repository()
    clocks_file = gc.Clocks(s.cache_dir, repo)
    clocks = clocks_file.load()
    deleted, errors = [], []
    now = s.clock()
    for c in result.due:
        try:
            gc.delete(repository, c)
        except (OSError, UnpackedError) as exc:
            errors.append(f"{gc.describe(c, now)}: not deleted: {exc}")
            log.error("%s", errors[-1])
            continue
        clocks.pop(c.key, None)
        deleted.append(gc.describe(c, now))
        log.info("deleted %s", deleted[-1])
    clocks_file.save(clocks)
    for c in result.pending:
        log.info("pending: %s", gc.describe(c, now))
    return {"deleted": deleted, "pending": [gc.describe(c, now) for c in result.pending],
            "gone": result.gone, "errors": errors}


def task_gc():
    """Delete unreferenced images, flat images and layers past their grace period."""
    plan = current_plan()
    s = plan.settings
    for repo in plan.repos:
        yield {"name": repo, "actions": [(run_gc, [s, repo])],
               "uptodate": [NothingDue(repo)], "setup": [_txn(repo)],
               "doc": f"garbage collection of {repo} (grace {s.gc_grace:g} days, at most "
                      f"{s.gc_max_deletions} deletions a run)", "verbosity": 2}
