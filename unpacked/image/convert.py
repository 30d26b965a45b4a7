"""The conversion steps a task runs: ingest one layer, build one flat image, link one image.

Each step is idempotent and atomic: it builds beside its final path and is put in place
whole by the repository's writer. No image's claims about a blob are trusted for another
image: a layer is fetched from any image that names it, checked against its own digest, and
each image's claims (diff_id, media type) are checked against what was ingested.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

from ..errors import ImageError, RegistryError
from ..log import count
from ..reference import ImageRef
from ..registry.client import RegistryClient
from ..registry.resolved import Layer, PlatformImage
from ..repo.fs import UnsafePath
from ..repo.layout import CATALOG, FLAT, LAYERS, Repository, hex_of
from . import flatten, sandbox
from .ingest import Claims, LayerError, ingest, read_info

log = logging.getLogger(__name__)

FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
           "application/vnd.oci.image.layer.nondistributable.v1.tar",
           "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
           "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")
LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar",
               "application/vnd.oci.image.layer.v1.tar+gzip",
               "application/vnd.oci.image.layer.v1.tar+zstd",
               "application/vnd.docker.image.rootfs.diff.tar.gzip",
               "application/vnd.docker.image.rootfs.diff.tar") + FOREIGN


@dataclass(frozen=True)
class Options:
    """How layers may be fetched and how large they may be (from the settings)."""

    foreign: bool = False             # fetch non-distributable layers from their urls
    max_bytes: int = 64 << 30         # bytes a layer may uncompress and write to


def ingest_layer(client: RegistryClient, sources: list[tuple[ImageRef, Layer]],
                 repo: Repository, options: Options = Options()) -> dict:
    """Download, verify and unpack one blob into ``.layers/<hex>``, from the first image
    naming it that serves it whole (streamed, never buffered)."""
    digest = sources[0][1].digest
    usable = [(ref, layer) for ref, layer in sources if layer.media_type in LAYER_TYPES]
    if not usable:
        ref, layer = sources[0]
        raise ImageError(f"layer {digest} of {ref}: media type {layer.media_type!r} is not a "
                         "filesystem layer")
    claims = Claims(digest, tuple(sorted({layer.diff_id for _, layer in usable})),
                    usable[0][1].media_type, max(layer.size for _, layer in usable))
    problems: list[str] = []
    for ref, layer in _distinct(usable):
        try:
            return _ingest_from(client, (ref, layer), claims, repo, options)
        except RegistryError as exc:
            problems.append(str(exc))
            if len(usable) > 1:
                log.warning("%s; trying another image that names it", exc)
    raise RegistryError("; ".join(problems))


def _distinct(sources: list[tuple[ImageRef, Layer]]) -> list[tuple[ImageRef, Layer]]:
    seen, out = set(), []
    for ref, layer in sources:
        key = (ref.api_host, ref.repository, layer.size, layer.urls)
        if key not in seen:
            seen.add(key)
            out.append((ref, layer))
    return out


def _ingest_from(client: RegistryClient, source: tuple[ImageRef, Layer], claims: Claims,
                 repo: Repository, options: Options) -> dict:
    ref, layer = source
    if layer.size > options.max_bytes + (1 << 20):
        raise ImageError(f"layer {layer.digest} of {ref}: {layer.size:,} bytes announced, more "
                         f"than max_layer_bytes ({options.max_bytes:,}); refused")
    url = None
    if layer.media_type in FOREIGN and layer.urls:
        if not options.foreign:
            raise ImageError(f"layer {layer.digest} of {ref} is a foreign layer served from "
                             f"{layer.urls[0]}; set foreign_layers=1 to fetch it from there")
        url = layer.urls[0]
    started = time.monotonic()
    stream = client.open_blob(ref, layer.digest, layer.size, url)
    try:
        info = ingest(stream, repo, Claims(claims.digest, claims.diff_ids, layer.media_type,
                                           layer.size), max_bytes=options.max_bytes)
    finally:
        stream.close()
    seconds = max(time.monotonic() - started, 1e-6)
    info["seconds"] = round(seconds, 3)
    info["received"] = stream.received
    log.info("layer %s: %s in %.1fs (%s/s), %s", layer.digest[7:19], human(stream.received),
             seconds, human(stream.received / seconds), count(info["entries"], "entry"))
    return info


def check_layers(repo: Repository, name: str, image: PlatformImage) -> list[dict]:
    """Every layer of ``image`` is ingested and is what *this* image's config says it is."""
    infos = []
    for layer in image.layers:
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(f"{name}: layer {layer.digest} has media type "
                             f"{layer.media_type!r}, not a filesystem layer")
        info = read_info(repo, layer.digest)
        if info is None:
            raise ImageError(f"{name}: layer {layer.digest} is not ingested")
        if info.get("diff_id") != layer.diff_id:
            raise ImageError(f"{name}: its config says layer {layer.digest} has diff_id "
                             f"{layer.diff_id}, but its content hashes to {info.get('diff_id')}")
        infos.append(info)
    return infos


def build_flat(repo: Repository, name: str, image: PlatformImage, mode: str = "hardlink") -> dict:
    """Merge the image's layers into ``.flat/<config-hex>`` and add the Apptainer files."""
    infos = check_layers(repo, name, image)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        layers = [stack.enter_context(_open_layerfs(repo, x.digest)) for x in image.layers]
        external = [dict(info.get("external_links") or {}) for info in infos]
        with repo.building(FLAT, hex_of(image.config_digest)) as out:
            stats = flatten.flatten(layers, external, out, mode)
            sandbox.write(out, image.config_doc)
            if repo.catalogs:
                out.remove(CATALOG)
                os.close(out.create(CATALOG, 0o644))
    stats["seconds"] = round(time.monotonic() - started, 3)
    log.info("flat %s: %s, %s (%s) in %.1fs", image.config_digest[7:19],
             count(stats["entries"], "entry"), count(stats["files"], "file"), mode,
             stats["seconds"])
    return stats


@contextlib.contextmanager
def _open_layerfs(repo: Repository, digest: str):
    try:
        with repo.open() as root, root.sub(f"{LAYERS}/{hex_of(digest)}/layerfs") as folder:
            yield folder
    except UnsafePath as exc:
        raise LayerError(f"layer {digest}: {exc}") from None


def summary(name: str, image: PlatformImage, top_digest: str, written: str, public: str,
            resolved_at: float) -> dict:
    cfg = image.config_doc
    return {"input": written, "name": name, "platform": image.platform,
            "tag_digest": top_digest, "manifest_digest": image.manifest_digest,
            "config_digest": image.config_digest,
            "layers": [x.digest for x in image.layers], "public_path": public,
            "working_dir": cfg.working_dir, "user": cfg.user,
            "entrypoint": list(cfg.entrypoint) if cfg.entrypoint is not None else None,
            "cmd": list(cfg.cmd) if cfg.cmd is not None else None,
            "os": cfg.os, "architecture": cfg.architecture, "variant": cfg.variant,
            "resolved_at": resolved_at}


def link_image(repo: Repository, name: str, image: PlatformImage, record: dict,
               public: str, target: str) -> bool:
    """Write the image's metadata (``.metadata/<name>``), then point ``public`` at
    ``target``; True if the link moved."""
    check_layers(repo, name, image)
    if not repo.has_flat(image.config_digest):
        raise ImageError(f"{name}: flat image {image.config_digest} missing")
    repo.write_metadata(name, image.manifest, image.config, record)
    return repo.link(public, target)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

