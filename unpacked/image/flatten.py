"""Flattening: the merged view of unpacked layers -> one folder, each surviving file written once.

Layers are read top-down (as go-containerregistry's ``mutate.Extract`` does): the first layer
to name a path decides it; a whiteout or an opaque folder hides lower layers only; a
non-folder hides everything below its path. A hardlink to a lower layer (recorded at ingest)
is an entry of *its* layer, whose content is its target as the layers below it had it, as
``umoci unpack`` applies layers in order. The plan is worked out first, then written in path
order, so flattening costs about one copy of the final image however many layers there are.

Every read and write goes through ``repo.fs`` descriptors: nothing is followed through a
symlink, on either side.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, field

from ..errors import sanitize
from ..repo.fs import Dir, FolderCache, UnsafePath
from ..repo.layout import CATALOG, IS_ROOT
from .ingest import OPAQUE, WHITEOUT

log = logging.getLogger(__name__)
DIR, FILE, LINK, OTHER = "d", "f", "l", "o"
COPY_CHUNK = 1 << 20
LINKERS = 2                    # threads making a flat image's hardlinks
MIN_SHARE = 2_000              # links per thread below which one thread does them all


def _kind(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return LINK
    if entry.is_dir(follow_symlinks=False):
        return DIR
    if entry.is_file(follow_symlinks=False):
        return FILE
    return OTHER


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class MergedTree:
    """What the merged tree holds: path -> (layer, kind, source path in that layer)."""

    decided: dict[str, tuple[int, str, str | None]] = field(default_factory=dict)
    missing_links: list[str] = field(default_factory=list)
    linked: set[tuple[int, str]] = field(default_factory=set)   # files a lower link names

    def source(self, rel: str) -> tuple[int, str]:
        layer, _, source = self.decided[rel]
        return layer, source or rel

    def ordered(self) -> list[str]:
        """Paths in tree order: a folder before what it holds, siblings together."""
        return sorted(self.decided, key=lambda rel: rel.replace("/", "\0"))


class _Merge:
    """The top-down walk of ``merge``; one instance per flattening."""

    def __init__(self, layers: list[Dir], external: list[dict[str, str]]):
        self.layers, self.external = layers, external
        self.plan = MergedTree()
        self.whited: set[str] = set()         # paths hidden from lower layers
        self.opaque: set[str] = set()         # folders whose lower children are hidden

    def run(self) -> MergedTree:
        for index in range(len(self.layers) - 1, -1, -1):
            new_whited: set[str] = set()
            new_opaque: set[str] = set()
            self._scan(index, new_whited, new_opaque)
            self._links(index)
            self.whited |= new_whited
            self.opaque |= new_opaque
        return self.plan

    def _scan(self, index: int, new_whited: set[str], new_opaque: set[str]) -> None:
        decided = self.plan.decided
        stack = [("", Dir(os.dup(self.layers[index].fd), "layer"))]
        while stack:
            folder, handle = stack.pop()
            with handle:
                if folder in self.opaque:
                    continue            # an upper layer made this folder opaque: nothing lower
                for entry in sorted(handle.scandir(), key=lambda e: e.name):
                    name = entry.name
                    rel = f"{folder}/{name}" if folder else name
                    if not folder and name == CATALOG:
                        continue                    # a layer's CVMFS catalog marker
                    if name == OPAQUE:
                        new_opaque.add(folder)
                        continue
                    if name.startswith(WHITEOUT):
                        hidden = name[len(WHITEOUT):]
                        new_whited.add(f"{folder}/{hidden}" if folder else hidden)
                        continue
                    if rel in self.whited:
                        continue
                    kind = _kind(entry)
                    upper = decided.get(rel)
                    if upper is not None:
                        if upper[1] == DIR and kind == DIR:
                            stack.append((rel, handle.child(name)))   # merge the children
                        elif upper[1] == DIR:
                            new_opaque.add(rel)     # this non-folder hid what lies below it
                        continue
                    decided[rel] = (index, kind, None)
                    if kind == DIR:
                        stack.append((rel, handle.child(name)))

    def _visible(self, rel: str) -> bool:
        """Would an entry of the current layer at ``rel`` show through the upper layers?"""
        decided = self.plan.decided
        if rel in self.whited or rel in decided:
            return False
        for folder in _ancestors(rel):
            if folder in self.whited or folder in self.opaque:
                return False
            upper = decided.get(folder)
            if upper is None or upper[1] != DIR:
                return False
        return True

    def _links(self, index: int) -> None:
        """Hardlinks of layer ``index`` whose targets are in lower layers."""
        for rel, target in sorted(self.external[index].items()):
            if not self._visible(rel):
                continue
            found = _lookup(self.layers, index, target)
            if found is None:
                self.plan.missing_links.append(rel)
                continue
            self.plan.decided[rel] = (found[0], found[1], target)
            self.plan.linked.add((found[0], target))


def _lookup(layers: list[Dir], below: int, target: str) -> tuple[int, str] | None:
    """The layer under ``below`` and the kind (file or symlink) of what is at ``target`` in
    the tree those layers make, or None when it is hidden, missing or a folder there."""
    parts = target.split("/")
    for i in range(below - 1, -1, -1):
        here = _probe(layers[i], parts)
        if here in (FILE, LINK):
            return i, here
        if here != "absent":
            return None
    return None


def _probe(layer: Dir, parts: list[str]) -> str:
    """In one layer: ``FILE`` or ``LINK`` (the target is here), ``other`` (something else
    is), ``hidden`` (a whiteout, an opaque folder or a non-folder on the way hides the layers
    below) or ``absent`` (look lower)."""
    current = Dir(os.dup(layer.fd), "layer")
    try:
        opaque = current.lstat(OPAQUE) is not None
        for depth, name in enumerate(parts):
            st = current.lstat(name)
            if st is None:
                hidden = opaque or current.lstat(WHITEOUT + name) is not None
                return "hidden" if hidden else "absent"
            if depth == len(parts) - 1:
                return FILE if stat.S_ISREG(st.st_mode) else \
                    LINK if stat.S_ISLNK(st.st_mode) else "other"
            if not stat.S_ISDIR(st.st_mode):
                return "hidden"
            nxt = current.child(name)
            current.close()
            current = nxt
            opaque = opaque or current.lstat(OPAQUE) is not None
        return "absent"
    except (UnsafePath, OSError):
        return "hidden"
    finally:
        current.close()


def merge(layers: list[Dir], external: list[dict[str, str]]) -> MergedTree:
    """What the merged tree of ``layers`` (bottom first) holds."""
    return _Merge(layers, external).run()


class _Writer:
    """Writes a plan into an empty output folder, by descriptors only."""

    def __init__(self, layers: list[Dir], out: Dir, mode: str):
        self.layers, self.mode = layers, mode
        self.out = FolderCache(out)
        self.sources = [FolderCache(layer) for layer in layers]
        self.copies: dict[tuple[int, int], str] = {}     # (layer, inode) -> first output path
        self.stats = {"entries": 0, "files": 0, "links": 0}

    def close(self) -> None:
        self.out.close()
        for cache in self.sources:
            cache.close()

    def write(self, result: MergedTree) -> list[str]:
        """Folders and symlinks in path order; files as they come (copies) or, as links,
        after every folder exists, by ``LINKERS`` threads at once."""
        self.linked = result.linked
        folders, links = [], 0
        decided, linking = result.decided, self.mode == "hardlink"
        ordered = result.ordered()
        self.stats["entries"] += len(ordered)
        for rel in ordered:
            source_layer, kind, source = decided[rel]
            if kind == FILE and linking:
                links += 1
                continue
            source = source or rel
            parent_rel, _, name = rel.rpartition("/")
            src_parent_rel, _, src_name = source.rpartition("/")
            parent = self.out.get(parent_rel)
            src = self.sources[source_layer].get(src_parent_rel)
            if kind == DIR:
                parent.mkdir(name, 0o700)
                folders.append(rel)
            elif kind == LINK:
                parent.new_symlink(name, src.readlink(src_name) or "")
                self._attributes(src, src_name, parent, name)
            elif kind == FILE:
                self._file(src, src_name, (source_layer, source), parent, name, rel)
        if links:
            self.stats["files"] += links
            self._link_all(ordered, decided, links)
        return folders

    def _link_all(self, ordered: list[str], decided: dict, links: int) -> None:
        """The files' links, each thread over a contiguous share of the tree (folders stay
        mostly one thread's) with folder caches of its own: a link is one system call, and
        the kernel makes links in different folders at once (300,000 files: 3.1 s by one
        thread, 2.0 s by two). Nothing is listed beforehand: memory stays the plan's."""
        share = -(-len(ordered) // LINKERS)
        if links < MIN_SHARE * LINKERS:
            share = len(ordered)
        errors: list[BaseException] = []

        def run(start: int) -> None:
            try:
                self._link(ordered, decided, start, start + share)
            except BaseException as exc:    # noqa: BLE001 - raised by the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(start,), name="flat-link")
                   for start in range(share, len(ordered), share)]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _link(self, ordered: list[str], decided: dict, start: int, end: int) -> None:
        """The files among ``ordered[start:end]``, linked in runs of the same folders (each
        run's folders looked up once: Python between the calls is serialised by the GIL)."""
        out = FolderCache(self.out.root)
        sources = [FolderCache(cache.root) for cache in self.sources]
        key: tuple[str, int, str] | None = None
        names: list[tuple[str, str]] = []

        def flush() -> None:
            if names:
                parent_rel, layer, src_parent_rel = key
                out.get(parent_rel).hardlinks(sources[layer].get(src_parent_rel), names)
                names.clear()

        try:
            for index in range(start, min(end, len(ordered))):
                rel = ordered[index]
                layer, kind, source = decided[rel]
                if kind != FILE:
                    continue
                parent_rel, _, name = rel.rpartition("/")
                src_parent_rel, src_name = parent_rel, name
                if source is not None:
                    src_parent_rel, _, src_name = source.rpartition("/")
                here = (parent_rel, layer, src_parent_rel)
                if here != key:
                    flush()
                    key = here
                names.append((src_name, name))
            flush()
        finally:
            out.close()
            for cache in sources:
                cache.close()

    def _file(self, src: Dir, src_name: str, origin: tuple[int, str], parent: Dir, name: str,
              rel: str) -> None:
        """A copy of ``origin`` (layer, path), made once per inode."""
        self.stats["files"] += 1
        st = src.lstat(src_name)
        key = (origin[0], st.st_ino)
        if key in self.copies:
            first_parent, _, first_name = self.copies[key].rpartition("/")
            parent.hardlink(self.out.get(first_parent), first_name, name)
            self.stats["links"] += 1
            return
        with src.open_file(src_name) as reader:
            fd = parent.create(name, stat.S_IMODE(st.st_mode))
            with os.fdopen(fd, "wb", buffering=0) as writer:
                while chunk := reader.read(COPY_CHUNK):
                    writer.write(chunk)
                if IS_ROOT:
                    os.fchown(fd, st.st_uid, st.st_gid)
                os.utime(fd, ns=(st.st_mtime_ns, st.st_mtime_ns))
        if st.st_nlink > 1 or origin in self.linked:
            self.copies[key] = rel

    def _attributes(self, src: Dir, src_name: str, parent: Dir, name: str) -> None:
        st = src.lstat(src_name)
        if IS_ROOT:
            parent.chown(name, st.st_uid, st.st_gid)
        parent.utime(name, (st.st_mtime_ns, st.st_mtime_ns))

    def finish_folders(self, result: MergedTree, folders: list[str]) -> None:
        """Folder modes, owners and times last: writing their children changed them."""
        for rel in reversed(folders):
            layer, _ = result.source(rel)
            src_parent_rel, _, src_name = rel.rpartition("/")
            st = self.sources[layer].get(src_parent_rel).lstat(src_name)
            parent_rel, _, name = rel.rpartition("/")
            parent = self.out.get(parent_rel)
            parent.chmod(name, stat.S_IMODE(st.st_mode) | 0o700)
            if IS_ROOT:
                parent.chown(name, st.st_uid, st.st_gid)
            parent.utime(name, (st.st_mtime_ns, st.st_mtime_ns))


def flatten(layers: list[Dir], external: list[dict[str, str]], out: Dir,
            mode: str = "hardlink") -> dict:
    """Write the merged tree of ``layers`` (open ``layerfs`` folders, bottom first) into the
    empty folder ``out``. ``external[i]`` are layer i's hardlinks to lower layers.

    ``hardlink`` links each regular file to its layer copy (the caller must never write
    through such a file: replace it instead); ``copy`` writes new files, keeping hardlinks
    inside a layer as hardlinks.
    """
    result = merge(layers, external)
    for rel in result.missing_links[:20]:
        log.warning("hardlink %s names a file no lower layer has; left out", sanitize(rel, 200))
    writer = _Writer(layers, out, mode)
    try:
        out.chmod_self(0o755)
        folders = writer.write(result)
        writer.finish_folders(result, folders)
    finally:
        writer.close()
    stats = dict(writer.stats, missing_links=len(result.missing_links))
    return stats
