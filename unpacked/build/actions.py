"""The actions of doit's tasks: module-level functions of the run's ``Context``.

Each raises on failure, and ``@step`` turns an image's own failure into a value
(``{"failed": reason}``) rather than a doit failure, so that doit goes on to publish what
succeeded; the reporter counts it and sets the exit code. A failure that must stop the tasks
behind it (the transaction cannot be opened) is a doit failure instead. ``@remote`` actions
run in the run's worker processes (workers.py): what they are given crosses a pipe, and they
read the cache on disk, never the plan.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from doit.exceptions import TaskFailed

from ..errors import ImageError, Unauthorized, UnpackedError, sanitize
from ..reference import parse
from ..registry.resolved import Layer, PlatformImage, Resolved
from . import notify
from .context import Context
from .workers import remote

log = logging.getLogger(__name__)


def step(action):
    """Run an action; an UnpackedError (or a filesystem error) becomes a failure value."""
    @functools.wraps(action)
    def run(ctx: Context, *args, **kwargs) -> dict:
        try:
            values = action(ctx, *args, **kwargs) or {}
        except (UnpackedError, OSError) as exc:
            reason = sanitize(_reason(exc), 1000)
            log.error("%s", reason)
            values = {"failed": reason}
        return dict(values, set=ctx.recipe_set_id)
    return run


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, UnpackedError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{where}"
    return str(exc)


def _resolved(ctx: Context, name: str) -> Resolved:
    """The resolved state the plan was made from (resolved before tasks were generated),
    with its manifest and config bytes."""
    resolved = ctx.state.resolved(name, with_bytes=True)
    if resolved is None:
        raise ImageError(f"{name}: no resolved state in the cache; run doit again")
    return resolved


def _image(resolved: Resolved, config: str) -> PlatformImage:
    for image in resolved.images:
        if image.config_digest == config:
            return image
    raise ImageError(f"{resolved.name}: no platform image with config {config} in the cache; "
                     "run doit again")


@remote
def begin(ctx: Context, repo: str) -> TaskFailed | None:
    """Open the repository's transaction; if that fails, nothing behind it may run."""
    try:
        ctx.publisher(repo).begin()
    except UnpackedError as exc:
        log.error("%s", exc)
        return TaskFailed(f"{repo}: transaction not opened: {exc}")
    return None


@remote
@step
def ingest(ctx: Context, sources: list[tuple[str, Layer]], repos: list[str]) -> dict:
    from ..image.convert import Options, ingest_layer
    pairs = [(parse(ref), layer) for ref, layer in sources]
    options = Options(ctx.settings.foreign_layers, ctx.settings.max_layer_bytes)
    digest, received = pairs[0][1].digest, 0
    for repo in repos:
        with notify.step(ctx.settings.notification_file, "layer_conversion",
                         image=pairs[0][0].name, layer_digest=digest,
                         size_bytes=pairs[0][1].size):
            info = ingest_layer(ctx.client, pairs, ctx.publisher(repo).repository(), options)
        received += info.get("received", 0)
    return {"digest": digest, "bytes": received}


@remote
@step
def flatten(ctx: Context, name: str, config: str, repos: list[str], key: str) -> dict:
    from ..image.convert import build_flat
    image = _image(_resolved(ctx, name), config)
    for repo in repos:
        with notify.step(ctx.settings.notification_file, "flat_conversion", image=name,
                         private_path=f".flat/{config[7:]}"):
            build_flat(ctx.publisher(repo).repository(), name, image,
                       ctx.settings.flatten_mode)
    return {"key": key}


def _record(ctx: Context, resolved: Resolved, image: PlatformImage, written: str,
            public: str) -> dict:
    from ..image.convert import summary
    record = summary(resolved.name, image, resolved.top_digest, written, public,
                     resolved.resolved_at)
    record["platforms"] = [{"platform": i.platform, "arch": i.arch,
                            "manifest_digest": i.manifest_digest,
                            "config_digest": i.config_digest,
                            "layers": [x.digest for x in i.layers]} for i in resolved.images]
    record["missing_platforms"] = list(resolved.missing)
    return record


@remote
@step
def link_platform(ctx: Context, name: str, config: str, repos: list[str]) -> dict:
    """One platform of a multi-platform image: its ``.multiarch`` link and metadata."""
    from ..image.convert import link_image
    from ..repo.layout import public_target
    from ..repo.multiarch import ensure_aliases
    from .plan import multiarch_name
    resolved = _resolved(ctx, name)
    image = _image(resolved, config)
    path = multiarch_name(image.arch, name)
    for repo in repos:
        repository = ctx.publisher(repo).repository()
        link_image(repository, f"{path.split('/', 1)[0]}/{image.arch}/{name}", image,
                   _record(ctx, resolved, image, name, path), path,
                   public_target(path, image.config_digest))
        ensure_aliases(repository)
    return {"manifest": image.manifest_digest}


@remote
@step
def link(ctx: Context, name: str, targets: list[tuple[str, str, str]], variant: bool) -> dict:
    """Write metadata and flip the public link in each ``(repo, public path, input)``."""
    from ..image.convert import check_layers, link_image
    from .plan import public_link
    resolved = _resolved(ctx, name)
    first = resolved.images[0]
    several = len(resolved.images) > 1
    changes = []
    for repo, public, written in targets:
        repository = ctx.publisher(repo).repository()
        for image in resolved.images[1:]:
            check_layers(repository, name, image)
        before = repository.link_target(public)
        target = public_link(public, name, first, several, ctx.settings.cvmfs_arch, variant)
        moved = link_image(repository, name, first, _record(ctx, resolved, first, written,
                                                            public), public, target)
        change = "added" if before is None else "updated" if moved else "rewritten"
        note_change(ctx, repo, f"{change} {name}")
        notify.emit(ctx.settings.notification_file, "publish_flat_image", image=name,
                    public_path=public, private_path=f".flat/{first.config_digest[7:]}",
                    status="ok")
        log.info("%s %s -> %s", change, public, target)
        changes.append(change)
    return {"manifest": resolved.top_digest, "change": changes[0] if changes else ""}


def fail(ctx: Context, reason: str) -> dict:
    """The task of an image that could not be resolved: fails with the registry's reason."""
    return {"failed": reason, "set": ctx.recipe_set_id}


def gone(ctx: Context, reason: str) -> dict:
    """An image converted before whose tag is now gone upstream: kept, reported."""
    return {"gone": reason, "set": ctx.recipe_set_id}


@remote
@step
def push_thin(ctx: Context, name: str, targets: list[tuple[str, str, str, str | None]],
              key: str) -> dict:
    """Push the thin image of ``name`` for each ``(repo, origin, output, user)``."""
    from ..image import thin
    resolved = _resolved(ctx, name)
    pushed = []
    for repo, origin, output, user in targets:
        publisher = ctx.publisher(repo)
        if publisher.is_open():
            raise ImageError(f"{name}: {repo} is not published yet; thin image not pushed (it "
                             "would name paths clients cannot see)")
        repository = publisher.repository()
        for image in resolved.images:
            missing = [x.digest for x in image.layers if not repository.has_layer(x.digest)]
            if missing:
                raise ImageError(f"{name}: layers missing in {repo}: {', '.join(missing)}")
        out = parse(output)
        _warn_without_credentials(ctx, out.api_host, user)
        try:
            thin.push_all(ctx.pusher(user, out.api_host), out, origin, repo, resolved.images,
                          ctx.state)
        except Unauthorized as exc:
            who = f"user {user} with {thin.PASSWORD_ENV}" if user and thin.password() \
                else "the Docker config's credentials, or none"
            raise ImageError(f"unauthorized for {out.registry}: pushing thin images as {who} "
                             f"was refused ({exc.status} {exc.code or ''})".replace(" )", ")")) \
                from None
        log.info("pushed thin image %s", output)
        pushed.append(output)
    return {"key": key, "pushed": pushed}


def _warn_without_credentials(ctx: Context, host: str, user: str | None) -> None:
    """Say so when a push is due with no credentials at all (unless the registry is marked
    as taking anonymous pushes: setting ``anonymous``)."""
    from ..image.thin import PASSWORD_ENV, password
    from ..registry.auth import find_credential
    if (user and password()) or host in ctx.settings.anonymous or find_credential(host):
        return
    log.warning("thin images go to %s but no credentials are set (%s for user %s, or a Docker "
                "config entry for %s); pushing anonymously (setting anonymous=%s says this is "
                "intended)", host, PASSWORD_ENV, user, host, host)


@remote
@step
def publish(ctx: Context, repo: str) -> dict:
    return {"errors": ctx.publisher(repo).publish(run_message(ctx, repo))}


def _changes_file(ctx: Context, repo: str) -> Path:
    return ctx.settings.cache_dir / "transactions" / f"{repo}.changes"


def note_change(ctx: Context, repo: str, line: str) -> None:
    path = _changes_file(ctx, repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def run_message(ctx: Context, repo: str, deleted: int = 0) -> str:
    """The publish message: what this run changed, in a line."""
    path = _changes_file(ctx, repo)
    try:
        lines = path.read_text().splitlines()
        path.unlink()
    except FileNotFoundError:
        lines = []
    gc_lines = [x for x in lines if x.startswith("gc ")]
    lines = [x for x in lines if not x.startswith("gc ")]
    deleted += sum(int(x.split()[1]) for x in gc_lines if x.split()[1].isdigit())
    shown = ", ".join(lines[:5]) + (f", +{len(lines) - 5} more" if len(lines) > 5 else "")
    text = f"unpacked: {len(lines)} image(s) changed" + (f": {shown}" if lines else "")
    if deleted:
        text += f"; gc deleted {deleted}"
    return text


def collect(ctx: Context, repo: str) -> dict:
    """Garbage collection of ``repo``: what the recipes want is read from the plan here, in
    the main process (the only one that holds it); the deletions run in a worker."""
    from .plan import gc_wants
    return delete_due(ctx, repo, gc_wants(ctx, ctx.plan, repo))


@remote
@step
def delete_due(ctx: Context, repo: str, wants) -> dict:
    """Delete what is due (oldest first, at most gc_max_deletions) inside the transaction."""
    from ..repo import gc
    from .plan import collection
    clocks_file = gc.Clocks(ctx.settings.cache_dir, repo)
    clocks = clocks_file.load()
    result = collection(ctx, wants, repo, clocks, remember=True)
    repository = ctx.publisher(repo).repository()
    deleted, errors = [], []
    now = ctx.settings.clock()
    for c in result.due:
        try:
            gc.delete(repository, c, result.protected)
        except (OSError, UnpackedError) as exc:
            errors.append(f"{gc.describe(c, now)}: not deleted: {_reason(exc)}")
            log.error("%s", errors[-1])
            continue
        clocks.pop(c.key, None)
        deleted.append(gc.describe(c, now))
        log.info("deleted %s", deleted[-1])
    clocks_file.save(clocks)
    if deleted:
        note_change(ctx, repo, f"gc {len(deleted)}")
    for c in result.pending:
        log.info("pending: %s", gc.describe(c, now))
    return {"deleted": deleted, "pending": [gc.describe(c, now) for c in result.pending],
            "gone": result.gone, "errors": errors, "blocked": result.blocked,
            "pid": os.getpid()}
