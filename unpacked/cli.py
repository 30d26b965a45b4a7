"""The ``unpacked`` command: inspection and maintenance next to the doit build.

Commands are thin: they parse options and call the library functions the tasks call too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import log, recipe, reference, settings
from .build.context import context
from .errors import BadReference, RecipeError, UnpackedError


def _settings() -> settings.Settings:
    return settings.load()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.version_option(package_name="unpacked")
def cli(verbose: int, quiet: bool) -> None:
    """Keep a CernVM-FS repository of unpacked container images in step with recipes."""
    log.setup(0 if quiet else (verbose or None))


@cli.command()
@click.argument("recipes", nargs=-1, type=click.Path(path_type=Path))
def check(recipes: tuple[Path, ...]) -> None:
    """Validate RECIPES (files or folders) and print each parsed image, one line each."""
    paths = list(recipes) or [_settings().recipe_path]
    try:
        loaded = recipe.load(paths)
    except RecipeError as exc:
        for line in exc.lines:
            click.echo(f"error: {line}", err=True)
        sys.exit(1)
    for r in loaded:
        for item in r.inputs:
            ref = item.ref
            extra = " (wildcard)" if ref.is_wildcard else ""
            output = r.output_of(ref)
            click.echo(f"{r.path}:{item.line}: {item.written} -> {ref.url}{extra} "
                       f"api={ref.api_host} repo={r.cvmfs_repo} public={r.public_path_of(ref)}"
                       + (f" thin={output}" if output else ""))


@cli.command()
@click.argument("image")
@click.option("--platform", default=None, help="os/arch[/variant] (setting: platform).")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved state as JSON.")
def manifest(image: str, platform: str | None, as_json: bool) -> None:
    """Resolve IMAGE on its registry and print digests, platform, layers and config."""
    s = _settings()
    try:
        ref = reference.parse(image)
    except BadReference as exc:
        raise click.ClickException(str(exc)) from None
    client = context(s).client
    resolved = client.resolve(ref, platform or s.platform)
    if as_json:
        d = resolved.to_dict()
        d["manifest"] = json.loads(resolved.manifest)
        d["config"] = json.loads(resolved.config)
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    cfg = resolved.config_json.get("config") or {}
    click.echo(f"image:     {resolved.name}")
    click.echo(f"tag:       {resolved.top_digest}")
    click.echo(f"manifest:  {resolved.manifest_digest} ({resolved.media_type})")
    click.echo(f"platform:  {resolved.platform}")
    click.echo(f"config:    {resolved.config_digest}")
    total = sum(max(0, layer.size) for layer in resolved.layers)
    click.echo(f"layers:    {len(resolved.layers)}, {total:,} bytes compressed")
    for layer in resolved.layers:
        click.echo(f"  {layer.digest}  {layer.size:>14,}  {layer.media_type}")
    for key in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User"):
        if cfg.get(key):
            click.echo(f"{key.lower() + ':':<11}{json.dumps(cfg[key])}")


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would go, and why (the default).")
def gc_command(dry_run: bool) -> None:
    """List what garbage collection deletes next run, what is pending and what waits.

    Deleting happens inside a transaction: `doit` (when the gc setting is on) or `doit gc`.
    """
    from .build.plan import build_plan, gc_plan
    from .repo import gc
    s = _settings()
    plan = build_plan(s)
    now = s.clock()
    for repo in plan.repos:
        result = gc_plan(plan, repo, save=True)
        click.echo(f"{repo}: {len(result.due)} to delete, {len(result.pending)} pending (limit "
                   f"{s.gc_max_deletions} a run), {len(result.waiting)} in their grace period")
        for c in result.due:
            click.echo(f"  delete  {gc.describe(c, now)}")
        for c in result.pending:
            click.echo(f"  pending {gc.describe(c, now)}")
        for c in result.waiting:
            days = (c.due - now) / gc.DAY
            click.echo(f"  waiting {gc.describe(c, now)}; due in {days:.1f} days")
        for name in result.gone:
            click.echo(f"  gone    {name}: gone upstream, kept (gc_prune_gone=1 removes it)")
    if not dry_run:
        click.echo("(nothing was deleted: `doit gc` deletes inside a transaction)")


def main() -> None:
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
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
