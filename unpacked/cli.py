"""The ``unpacked`` command: inspection and maintenance next to the doit build.

Commands are thin: they parse options and call the library functions the tasks call too.
Settings are resolved as ``doit``'s are (``UNPACKED_*``, defaults relative to the project
folder: ``--project``, ``UNPACKED_PROJECT``, or the current folder). Every error a user can
act on is printed by ``main`` as one line per problem with its exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import log, recipe, reference, settings
from .errors import UnpackedError


def _settings(project: Path | None) -> settings.Settings:
    base = project or Path(os.environ.get("UNPACKED_PROJECT") or Path.cwd())
    if not base.is_dir():
        raise UnpackedError(f"project folder {base}: no such folder")
    return settings.load(project=base)


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


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would go, and why (the default).")
@project_option
def gc_command(dry_run: bool, project: Path | None) -> None:
    """List what garbage collection deletes next run, what is pending and what waits.

    Nothing is changed: deleting happens inside a transaction, in a bare `doit` (setting
    gc on) or `doit gc`.
    """
    from .build.plan import collection
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
        result = collection(ctx, plan, repo, clocks)
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
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
