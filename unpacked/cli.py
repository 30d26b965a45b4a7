"""The ``unpacked`` command: inspection and maintenance next to the doit build.

Commands are thin: they parse options and call the library functions the tasks call too.
Settings are resolved as ``doit``'s are (``UNPACKED_*``, defaults relative to the project
folder: ``--project``, ``UNPACKED_PROJECT``, or the current folder). Every error a user can
act on is printed by ``main`` as one line per problem with its exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from . import log, recipe, reference, settings
from .errors import UnpackedError, environmental, from_os


def _settings(project: Path | None) -> settings.Settings:
    base = project or Path(os.environ.get("UNPACKED_PROJECT") or Path.cwd())
    if not base.is_dir():
        raise UnpackedError(f"project folder {base}: no such folder")
    found = settings.load(project=base)
    chosen = click.get_current_context().find_root().meta.get("unpacked.verbosity_given")
    if not chosen and found.verbosity >= 0:
        log.setup(found.verbosity)            # the setting, unless -v or -q said otherwise
    return found


def _context(project: Path | None):
    from .build.context import Context
    return Context(_settings(project))


project_option = click.option("--project", type=click.Path(path_type=Path, file_okay=False),
                              default=None, help="The project folder (where dodo.py, recipes/ "
                              "and cache/ are); default: UNPACKED_PROJECT or the current one.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.version_option(package_name="unpacked")
def cli(verbose: int, quiet: bool) -> None:
    """Keep a CernVM-FS repository of unpacked container images in step with recipes."""
    click.get_current_context().meta["unpacked.verbosity_given"] = bool(quiet or verbose)
    log.setup(0 if quiet else (verbose or -1))


@cli.command()
@click.argument("recipes", nargs=-1, type=click.Path(path_type=Path))
@project_option
def check(recipes: tuple[Path, ...], project: Path | None) -> None:
    """Validate RECIPES (files or folders) and print each parsed image, one line each."""
    paths = list(recipes) or [_settings(project).recipe_path]
    for r in recipe.load(paths):
        for item in r.inputs:
            ref = item.ref
            extra = " (wildcard)" if ref.is_wildcard else ""
            output = r.output_of(ref)
            platforms = f" platforms={','.join(r.platforms)}" if r.platforms else ""
            click.echo(f"{r.path}:{item.line}: {item.written} -> {ref.url}{extra} "
                       f"api={ref.api_host} repo={r.cvmfs_repo} public={r.public_path_of(ref)}"
                       + (f" thin={output}" if output else "") + platforms)


@cli.command()
@click.argument("image")
@click.option("--platform", "platforms", multiple=True,
              help="os/arch[/variant], repeatable, or all (setting: platforms).")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved state as JSON.")
@project_option
def manifest(image: str, platforms: tuple[str, ...], as_json: bool,
             project: Path | None) -> None:
    """Resolve IMAGE on its registry and print what it offers: digests, platforms, layers."""
    ctx = _context(project)
    ref = reference.parse(image)
    wanted = tuple(platforms) or ctx.settings.platforms
    if wanted != ("all",):
        wanted = settings.load({"platforms": ",".join(wanted)}, {}).platforms
    resolved = ctx.client.resolve(ref, wanted)
    if as_json:
        doc = resolved.to_dict()
        for entry, image_ in zip(doc["images"], resolved.images, strict=True):
            entry["manifest"] = json.loads(image_.manifest)
            entry["config"] = json.loads(image_.config)
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo(f"image:     {resolved.name}")
    click.echo(f"tag:       {resolved.top_digest} ({resolved.top_media_type})")
    click.echo(f"offers:    {', '.join(resolved.offered)}")
    for missing in resolved.missing:
        click.echo(f"not offered: {missing}")
    for image_ in resolved.images:
        _show_platform(image_)


def _show_platform(image) -> None:
    cfg = image.config_doc
    click.echo(f"platform:  {image.platform}")
    click.echo(f"  manifest:  {image.manifest_digest} ({image.media_type})")
    click.echo(f"  config:    {image.config_digest}")
    total = sum(max(0, layer.size) for layer in image.layers)
    click.echo(f"  layers:    {len(image.layers)}, {total:,} bytes compressed")
    for layer in image.layers:
        click.echo(f"    {layer.digest}  {layer.size:>14,}  {layer.media_type}")
    for key, value in (("env", cfg.env), ("entrypoint", cfg.entrypoint), ("cmd", cfg.cmd),
                       ("workingdir", cfg.working_dir), ("user", cfg.user)):
        if value:
            shown = list(value) if isinstance(value, tuple) else value
            click.echo(f"  {key + ':':<12}{json.dumps(shown)}")


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--recipe", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The recipe whose repository the images go into (default: every recipe "
              "that names them).")
@click.option("--adhoc", is_flag=True, help="Convert an image no recipe names (into the only "
              "recipe's repository, or --recipe's); the next run drops it again.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0,
              help="Seconds to wait when another run holds the repository (default: none).")
@project_option
def convert(images: tuple[str, ...], recipe: Path | None, adhoc: bool, wait: float,
            project: Path | None) -> None:
    """Convert IMAGES now, through the same tasks, locks and transaction as a run, without
    garbage collection (DUCC's convert-single-image); prints each public path."""
    from .build.single import convert as convert_images
    code, publics = convert_images(_settings(project), list(images), recipe, adhoc, wait)
    for path in publics:
        click.echo(path)
    sys.exit(code)


@cli.command()
@click.option("--bind", default="127.0.0.1:8088", show_default=True,
              help="host:port to listen on.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Accept notifications without the shared secret (tests only).")
@project_option
def listen(bind: str, insecure_no_auth: bool, project: Path | None) -> None:
    """Convert images seconds after they are pushed: accept registry notifications (the
    distribution registry's and Harbor's), queue what the recipes want, convert it."""
    import signal

    from .service.listen import serve
    settings_ = _settings(project)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):      # Ctrl-C: a clean stop
        serve(settings_, bind, settings_.project, insecure_no_auth)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Every image as JSON (for scripts).")
@project_option
def status(as_json: bool, project: Path | None) -> None:
    """Every image the recipes want: its state, digests, public path and last failure, and
    how the last run went (offline: reads the cache and the repository, changes nothing)."""
    from .build.status import images, read_status
    ctx = _context(project)
    ctx.writable = False
    found = images(ctx)
    last = read_status(ctx.settings.cache_dir)
    if as_json:
        click.echo(json.dumps({"last_run": last, "images": found}, indent=1, sort_keys=True))
        return
    for label, run in (("last run", last), ("last limited run", last.get("last_limited_run"))):
        if run and "exit_code" in run:
            click.echo(f"{label}: exit {run.get('exit_code')} after "
                       f"{run.get('duration_s', 0):.1f}s; counts {run.get('counts', {})}")
    for image in found:
        why = f"  ({image['failure']})" if image["failure"] and image["state"] != "published" \
            else ""
        click.echo(f"{image['state']:<11} {image['name']}{why}")


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would go, and why (the default).")
@project_option
def gc_command(dry_run: bool, project: Path | None) -> None:
    """List what garbage collection deletes next run, what is pending and what waits.

    Nothing is changed: deleting happens inside a transaction, in a bare `doit` (setting
    gc on) or `doit gc`.
    """
    from .build.plan import collection, gc_wants
    from .repo import gc
    ctx = _context(project)
    ctx.writable = False
    plan = ctx.plan
    now = ctx.settings.clock()
    for line in ctx.recipes.problems:
        click.echo(f"error: {line}", err=True)
    unresolved = [i.name for i in plan.images if i.resolved is None]
    if unresolved:
        click.echo(f"note: {log.count(len(unresolved), 'image')} without a resolved state "
                   f"yet (e.g. {unresolved[0]}): run doit first; wanted images are never "
                   "dropped", err=True)
    for repo in plan.repos:
        root = ctx.settings.repo_root / repo
        if not root.is_dir():
            raise UnpackedError(f"repository {repo}: {root} does not exist (nothing converted "
                                "yet, or the root setting is wrong)")
        clocks = gc.Clocks(ctx.settings.cache_dir, repo).load()      # a copy, never saved
        result = collection(ctx, gc_wants(ctx, plan, repo), repo, clocks)
        click.echo(f"{repo}: {len(result.due)} to delete, {len(result.pending)} pending "
                   f"(limit {ctx.settings.gc_max_deletions} a run), {len(result.waiting)} in "
                   "their grace period")
        if result.blocked:
            click.echo(f"  held    {result.blocked}")
        for c in result.due:
            click.echo(f"  delete  {gc.describe(c, now)}")
        for c in result.pending:
            click.echo(f"  pending {gc.describe(c, now)}")
        for c in result.waiting:
            days = max(c.due - now, 0.0) / gc.DAY
            click.echo(f"  waiting {gc.describe(c, now)}; due in {days:.1f} days")
        for name in result.gone:
            click.echo(f"  gone    {name}: gone upstream, kept (gc_prune_gone=1 removes it)")
    if not dry_run:
        click.echo("(nothing was deleted: `doit gc` deletes inside a transaction)")


def main() -> None:
    """The one handler: a user's mistake is one line per problem, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except UnpackedError as exc:
        for line in exc.messages():
            click.echo(f"error: {line}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:             # `unpacked status | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as exc:              # the machine's state (disk full, read-only), not a bug
        if not environmental(exc):
            raise
        click.echo(f"error: {from_os(exc)}", err=True)
        sys.exit(from_os(exc).exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
