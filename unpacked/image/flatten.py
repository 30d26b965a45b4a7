"""Flattening: the merged view of unpacked layers -> one folder, each surviving file written once.

Layers are read top-down (as go-containerregistry's ``mutate.Extract`` does): the first layer
to name a path decides it; a whiteout or an opaque folder hides lower layers only; a
non-folder hides everything below its path. The plan is worked out first, then written, so
flattening costs about one copy of the final image however many layers there are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from .ingest import CATALOG, OPAQUE, WHITEOUT

log = logging.getLogger(__name__)
IS_ROOT = os.geteuid() == 0


@dataclass
class Planned:
    rel: str
    source: str        # absolute path inside one layerfs
    layer: int         # index, bottom = 0
    kind: str          # dir, file, symlink, other


def _kind(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    return "other"


def plan(layerfs: list[Path]) -> list[Planned]:
    """What the merged tree holds, parents before children."""
    decided: dict[str, Planned] = {}
    order: list[Planned] = []
    whited: set[str] = set()          # paths hidden from lower layers
    opaque: set[str] = set()          # folders whose lower children are hidden
    for index in range(len(layerfs) - 1, -1, -1):
        root = str(layerfs[index])
        new_whited: set[str] = set()
        new_opaque: set[str] = set()
        stack = [""]
        while stack:
            folder = stack.pop()
            if folder in opaque:
                continue            # an upper layer made this folder opaque: nothing lower
            base = os.path.join(root, folder) if folder else root
            try:
                entries = list(os.scandir(base))
            except NotADirectoryError:
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                name = entry.name
                rel = f"{folder}/{name}" if folder else name
                if not folder and name == CATALOG:
                    continue                    # a layer's CVMFS catalog marker, not content
                if name == OPAQUE:
                    new_opaque.add(folder)
                    continue
                if name.startswith(WHITEOUT):
                    hidden = name[len(WHITEOUT):]
                    new_whited.add(f"{folder}/{hidden}" if folder else hidden)
                    continue
                if rel in whited:
                    continue
                kind = _kind(entry)
                upper = decided.get(rel)
                if upper is not None:
                    if upper.kind == "dir" and kind == "dir":
                        stack.append(rel)       # folder over folder: merge the children
                    elif upper.kind == "dir":
                        new_opaque.add(rel)     # this non-folder hid what lies below it
                    continue
                item = Planned(rel, entry.path, index, kind)
                decided[rel] = item
                order.append(item)
                if kind == "dir":
                    stack.append(rel)
        whited |= new_whited
        opaque |= new_opaque
    order.sort(key=lambda p: p.rel.count("/"))
    return order


def _external_links(layerfs: list[Path]) -> dict[str, str]:
    """Hardlinks whose targets were in lower layers (recorded at ingest)."""
    links: dict[str, str] = {}
    for path in layerfs:
        try:
            info = json.loads((path.parent / "layer.json").read_text())
        except (OSError, ValueError):
            continue
        links.update(info.get("external_links") or {})
    return links


def flatten(layerfs: list[Path], dest: Path, mode: str = "hardlink") -> dict:
    """Write the merged tree of ``layerfs`` (bottom first) into the empty folder ``dest``.

    ``mode`` ``hardlink`` links each regular file to its layer copy (the caller must never
    write through such a file: replace it instead); ``copy`` writes new files, keeping
    hardlinks inside a layer as hardlinks.
    """
    items = plan(layerfs)
    external = _external_links(layerfs)
    copies: dict[tuple[int, int], str] = {}     # (layer, inode) -> first output path
    dir_times: list[tuple[str, os.stat_result]] = []
    files = links = 0
    root = str(dest)
    os.chmod(root, 0o755)
    for item in items:
        out = os.path.join(root, item.rel)
        if item.kind == "file" and mode == "hardlink":
            os.link(item.source, out)
            files += 1
            continue
        st = os.lstat(item.source)
        if item.kind == "dir":
            os.mkdir(out, 0o700)
            dir_times.append((out, st))
            continue
        if item.kind == "symlink":
            os.symlink(os.readlink(item.source), out)
        elif item.kind == "file":
            files += 1
            key = (item.layer, st.st_ino)
            if st.st_nlink > 1 and key in copies:
                os.link(copies[key], out)
                links += 1
                continue
            shutil.copyfile(item.source, out, follow_symlinks=False)
            copies[key] = out
            os.chmod(out, stat.S_IMODE(st.st_mode))
        else:
            continue
        if IS_ROOT:
            os.lchown(out, st.st_uid, st.st_gid)
        os.utime(out, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
    present = {item.rel: item for item in items}
    for rel, target in sorted(external.items()):
        if rel in present or target not in present or present[target].kind == "dir":
            continue
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent and (parent not in present or present[parent].kind != "dir"):
            continue
        out = os.path.join(root, rel)
        if mode == "hardlink":
            os.link(present[target].source, out, follow_symlinks=False)
        else:
            os.link(os.path.join(root, target), out, follow_symlinks=False)
        links += 1
    for out, st in reversed(dir_times):
        os.chmod(out, stat.S_IMODE(st.st_mode) | 0o700)
        if IS_ROOT:
            os.lchown(out, st.st_uid, st.st_gid)
        os.utime(out, ns=(st.st_mtime_ns, st.st_mtime_ns))
    return {"entries": len(items), "files": files, "links": links}
