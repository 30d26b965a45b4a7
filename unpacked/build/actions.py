"""The actions of doit's tasks: module-level functions, picklable for ``doit -n N``.

An image's own failure is returned as a value (``{"failed": reason}``) rather than raised, so
doit goes on to publish what succeeded; the reporter counts it and sets the exit code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import Unauthorized, UnpackedError
from ..settings import Settings
from .context import context
from .plan import current_plan, gc_plan, load_recipes

log = logging.getLogger(__name__)


def _failed(exc: UnpackedError) -> dict:
    """A failure that is the image's, not the run's: recorded as a value, so that doit goes
    on to ``publish`` (what succeeded is published) while the reporter counts it as failed.
    Every up-to-date check asks for the value of a success, so the task runs again next time.
    """
    log.error("%s", exc)
    return {"failed": str(exc)}


def run_resolve(s: Settings) -> None:
    """Resolve every input over the network; failures are kept per image for its task."""
    from .refresh import Resolver
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


def _resolved(s: Settings, name: str):
    """The resolved state the plan was made from (resolved before tasks were generated)."""
    resolved = context(s).state.resolved(name, s.platform)
    if resolved is None:
        raise UnpackedError(f"{name}: no resolved state in the cache; run doit again")
    return resolved


def begin_transaction(s: Settings, repo: str) -> dict:
    try:
        context(s).publisher(repo).begin()
    except UnpackedError as exc:
        return _failed(exc)
    return {}


def ingest(s: Settings, layer: dict, ref_text: str, repos: list[str]) -> dict:
    from ..image.convert import ingest_layer
    from ..reference import parse
    from ..registry.resolved import Layer
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
    from ..image.convert import build_flat
    ctx = context(s)
    try:
        resolved = _resolved(s, name)
        for repo in repos:
            build_flat(ctx.publisher(repo).repository(), resolved, s.flatten_mode)
    except UnpackedError as exc:
        return _failed(exc)
    return {"key": key}


def link(s: Settings, name: str, targets: list[tuple[str, str, str]]) -> dict:
    """Write metadata and flip the public link in each ``(repo, public path, input)``."""
    from ..image.convert import link_image
    ctx = context(s)
    changes = []
    try:
        resolved = _resolved(s, name)
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
    from ..image import thin
    from ..reference import parse
    ctx = context(s)
    pushed = []
    try:
        resolved = _resolved(s, name)
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


def run_gc(s: Settings, repo: str) -> dict:
    """Delete what is due (oldest first, at most gc_max_deletions) inside the transaction."""
    from ..repo import gc
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
