"""The conversion steps a doit task runs: ingest one layer, build one flat image, link one image.

Each step is idempotent and atomic: it builds beside its final path and renames into place.
"""

from __future__ import annotations

import logging
import time

from ..errors import UnpackedError
from ..reference import ImageRef
from ..registry.client import RegistryClient
from ..registry.resolved import Layer, Resolved
from ..repo.fs import remove_tree, temp_sibling
from ..repo.layout import Repository
from . import flatten, sandbox
from . import ingest as layers
from .ingest import CATALOG

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


def ingest_layer(client: RegistryClient, ref: ImageRef, layer: Layer, repo: Repository, *,
                 foreign: bool = False, max_bytes: int = 64 << 30) -> dict:
    """Download, verify and unpack one layer into ``.layers/<hex>`` (streamed, never buffered)."""
    if layer.media_type and layer.media_type not in LAYER_TYPES:
        raise UnpackedError(f"layer {layer.digest} of {ref}: media type {layer.media_type!r} "
                            "is not a filesystem layer")
    url = None
    if layer.media_type in FOREIGN and layer.urls:
        if not foreign:
            raise UnpackedError(f"layer {layer.digest} of {ref} is a foreign layer served from "
                                f"{layer.urls[0]}; set foreign_layers=1 to fetch it from there")
        url = layer.urls[0]
    started = time.monotonic()
    stream = client.open_blob(ref, layer.digest, layer.size, url)
    try:
        info = layers.ingest(stream, repo.layer_dir(layer.digest), digest=layer.digest,
                             diff_id=layer.diff_id, media_type=layer.media_type,
                             size=layer.size, max_bytes=max_bytes, catalog=repo.catalogs,
                             place=repo.place_dir)
    finally:
        stream.close()
    seconds = max(time.monotonic() - started, 1e-6)
    info["seconds"] = round(seconds, 3)
    log.info("layer %s: %s in %.1fs (%s/s), %d entries", layer.digest[7:19],
             human(stream.received), seconds, human(stream.received / seconds), info["entries"])
    return info


def build_flat(repo: Repository, resolved: Resolved, mode: str = "hardlink") -> dict:
    """Merge the image's layers into ``.flat/<config-hex>`` and add the Apptainer files."""
    missing = [x.digest for x in resolved.layers if not repo.has_layer(x.digest)]
    if missing:
        raise UnpackedError(f"{resolved.name}: layers not ingested yet: {', '.join(missing)}")
    final = repo.flat_dir(resolved.config_digest)
    temp = temp_sibling(final)
    try:
        started = time.monotonic()
        stats = flatten.flatten([repo.layerfs(x.digest) for x in resolved.layers], temp, mode)
        sandbox.write(temp, resolved.config_json)
        if repo.catalogs:
            (temp / CATALOG).touch()
        repo.place_dir(temp, final)
    except BaseException:
        remove_tree(temp)
        raise
    stats["seconds"] = round(time.monotonic() - started, 3)
    log.info("flat %s: %d entries, %d files (%s) in %.1fs", resolved.config_digest[7:19],
             stats["entries"], stats["files"], mode, stats["seconds"])
    return stats


def summary(resolved: Resolved, written: str, public: str) -> dict:
    cfg = resolved.config_json
    inner = cfg.get("config") or {}
    return {"input": written, "name": resolved.name, "platform": resolved.platform,
            "tag_digest": resolved.top_digest, "manifest_digest": resolved.manifest_digest,
            "config_digest": resolved.config_digest,
            "layers": [x.digest for x in resolved.layers], "public_path": public,
            "working_dir": inner.get("WorkingDir") or "", "user": inner.get("User") or "",
            "entrypoint": inner.get("Entrypoint"), "cmd": inner.get("Cmd"),
            "os": cfg.get("os"), "architecture": cfg.get("architecture"),
            "resolved_at": resolved.resolved_at}


def link_image(repo: Repository, resolved: Resolved, written: str, public: str) -> bool:
    """Write the image's metadata, then flip its public symlink; True if the link moved."""
    if not repo.has_flat(resolved.config_digest):
        raise UnpackedError(f"{resolved.name}: flat image {resolved.config_digest} missing")
    repo.write_metadata(resolved.name, resolved.manifest, resolved.config,
                        summary(resolved, written, public))
    return repo.link(public, resolved.config_digest)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
