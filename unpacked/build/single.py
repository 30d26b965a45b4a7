"""Convert named images now (DUCC's ``convert-single-image``), as a run does, for them alone.

The images are matched to the recipes that want them (an input naming the tag, or a wildcard
input whose pattern matches it); each such recipe is cut down to those images, and doit runs
the same tasks under the same locks and in one transaction per repository, with no garbage
collection and without touching doit's records of other tasks. An image no recipe names is
converted only when asked (``adhoc``): the next bare run sees it as dropped from every recipe,
and garbage collection treats it so.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from ..errors import EXIT_SIGNAL, RecipeError, UnpackedError
from ..recipe import Input, Recipe, RecipeSet, read
from ..reference import ImageRef, parse
from ..settings import Settings
from .context import Context
from .dodo import doit_config, tune_gc
from .session import Interrupted, Session


def wants(item: Input, ref: ImageRef) -> bool:
    """Does this recipe input name the image (the tag itself, or a wildcard matching it)?"""
    want = item.ref
    if (want.registry, want.repository) != (ref.registry, ref.repository) and \
            (want.api_host, want.repository) != (ref.api_host, ref.repository):
        return False
    if want.is_wildcard:       # a tag it matches, never a digest smuggled beside the tag
        return ref.tag is not None and ref.digest is None and \
            fnmatch.fnmatchcase(ref.tag, want.tag)
    return (want.tag, want.digest) == (ref.tag, ref.digest)


def restrict(recipes: list[Recipe], refs: list[ImageRef], adhoc_into: Recipe | None,
             ) -> tuple[list[Recipe], list[ImageRef]]:
    """The recipes cut down to the images asked for; and the images no recipe wants."""
    out, unwanted = [], []
    chosen: dict[int, list[Input]] = {}
    for ref in refs:
        hits = [(r, i) for r in recipes for i in r.inputs if wants(i, ref)]
        if not hits and adhoc_into is not None:
            hits = [(adhoc_into, Input(ref, ref.url, 0))]
        if not hits:
            unwanted.append(ref)
        for recipe, item in hits:
            chosen.setdefault(id(recipe), []).append(replace(item, ref=replace(
                ref, registry=item.ref.registry, scheme=item.ref.scheme)))
    for recipe in recipes + ([adhoc_into] if adhoc_into is not None else []):
        inputs = chosen.pop(id(recipe), None)
        if inputs:
            unique = {i.ref.name: i for i in inputs}
            out.append(replace(recipe, inputs=tuple(unique.values())))
    return out, unwanted


def convert(settings: Settings, images: list[str], recipe_path=None, adhoc: bool = False,
            wait: float = 0.0) -> tuple[int, list[str]]:
    """Convert ``images``; returns the exit code and the public paths."""
    tune_gc()
    found = read(recipe_path or settings.recipe_path)
    if not found.recipes:
        raise RecipeError(found.problems or ["no recipe"])
    refs = [parse(text) for text in images]
    target = None
    if adhoc:
        if len(found.recipes) > 1:
            raise UnpackedError("several recipes: say with --recipe which one an ad hoc image "
                                "goes into")
        target = found.recipes[0]
    recipes, unwanted = restrict(found.recipes, refs, target)
    if unwanted:
        raise UnpackedError(f"{', '.join(str(r) for r in unwanted)}: not named by any recipe "
                            "(--adhoc converts it anyway; the next run then drops it)")
    ctx = Context(settings, RecipeSet(recipes, [], []))
    session = Session(ctx, full=False, wait=wait)
    try:
        session.start()
    except Interrupted:
        return EXIT_SIGNAL.get(session.interrupted or "", 130), []
    tasks = session.tasks()
    session.idle_images = lambda: tasks.idle_images
    namespace = {"DOIT_CONFIG": doit_config(ctx, session), **tasks.namespace()}
    selected = [f"publish:{r}" for r in sorted({r.cvmfs_repo for r in recipes})]
    if any(r.output_format for r in recipes):
        selected.append("thin")           # the thin images of these images: the plan's all
    try:
        code = DoitMain(ModuleTaskLoader(namespace), config_filenames=()).run(selected)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    publics = [f"{settings.repo_root / r.cvmfs_repo / r.public_path_of(i.ref)}"
               for r in recipes for i in r.inputs]
    return code, publics
