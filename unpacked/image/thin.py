"""Thin images: a one-layer Docker image whose ``thin.json`` lists the image's layers as
CVMFS paths, for the CVMFS graph driver of Docker and Podman (DUCC's format).

The same input gives byte-identical blobs on every run (fixed mtimes, owners and key order),
so an unchanged image is never pushed again, and a re-push changes no digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

from ..reference import ImageRef
from ..registry.resolved import PlatformImage

VERSION = 1                   # bump when the bytes below change: every thin image is re-pushed
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PASSWORD_ENV = "DUCC_OUTPUT_REGISTRY_PASS"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def thin_json(origin: str, repo: str, image: PlatformImage) -> bytes:
    layers = [{"digest": x.digest.partition(":")[2],
               "url": f"cvmfs://{repo}/.layers/{x.digest.partition(':')[2]}/layerfs"}
              for x in image.layers]
    doc = {"version": "1.0", "origin": origin, "layers": layers}      # DUCC's key order
    return json.dumps(doc, indent=2).encode()


@dataclass
class ThinImage:
    manifest: bytes
    config: bytes
    layer: bytes            # gzip-compressed tar holding thin.json
    thin: bytes             # thin.json itself

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def _inner(image: PlatformImage) -> dict:
    """The parts of the source config a thin image carries."""
    cfg = image.config_doc
    inner = {"Env": [e for e in cfg.env if not e.startswith("CVMFS_IMAGE=")]
             + ["CVMFS_IMAGE=true"]}
    for key, value in (("Entrypoint", cfg.entrypoint), ("Cmd", cfg.cmd),
                       ("WorkingDir", cfg.working_dir), ("User", cfg.user),
                       ("Labels", cfg.labels)):
        if value:
            inner[key] = list(value) if isinstance(value, tuple) else value
    return inner


def build(origin: str, repo: str, image: PlatformImage) -> ThinImage:
    """The thin image of ``image`` as converted into ``repo`` (``origin``: the input)."""
    thin = thin_json(origin, repo, image)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("thin.json")
        info.size, info.mode, info.mtime = len(thin), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(thin))
    tar_bytes = raw.getvalue()
    layer = gzip.compress(tar_bytes, compresslevel=9, mtime=0)
    cfg = image.config_doc
    platform = {"architecture": cfg.architecture, "os": cfg.os}
    if cfg.variant:
        platform["variant"] = cfg.variant
    config = _json({**platform, "config": _inner(image),
                    "rootfs": {"type": "layers", "diff_ids": [sha(tar_bytes)]},
                    "history": [{"created_by": f"unpacked thin image of {origin}"}]})
    manifest = _json({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                      "config": {"mediaType": CONFIG_TYPE, "size": len(config),
                                 "digest": sha(config)},
                      "layers": [{"mediaType": LAYER_TYPE, "size": len(layer),
                                  "digest": sha(layer)}]})
    return ThinImage(manifest, config, layer, thin)


def key(origin: str, repo: str, output: str, image: PlatformImage) -> str:
    """What decides a thin image's bytes and destination, hashed (for up-to-date checks)."""
    cfg = image.config_doc
    parts = [VERSION, origin, repo, output, [x.digest for x in image.layers], _inner(image),
             cfg.os, cfg.architecture, cfg.variant]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def index(images: list[PlatformImage], thins: list[ThinImage]) -> bytes:
    """The OCI index tying the thin images of several platforms together, so that a client
    pulls the one of its own platform (deterministic bytes)."""
    entries = []
    for image, thin_image in zip(images, thins, strict=True):
        cfg = image.config_doc
        platform = {"architecture": cfg.architecture, "os": cfg.os}
        if cfg.variant:
            platform["variant"] = cfg.variant
        entries.append({"mediaType": MANIFEST_TYPE, "digest": thin_image.digest,
                        "size": len(thin_image.manifest), "platform": platform})
    return _json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries})


def push(client, output: ImageRef, image: ThinImage, mount_from: str | None = None,
         reference: str | None = None) -> dict:
    """Push blobs (HEAD first, cross-repo mount when known, else upload), then the manifest
    at ``reference`` (default: the output's tag). Returns how each blob got there."""
    how = {"layer": client.push_blob(output, image.layer, sha(image.layer), mount_from),
           "config": client.push_blob(output, image.config, sha(image.config), mount_from)}
    client.put_manifest(output, reference or output.tag or output.digest, image.manifest,
                        MANIFEST_TYPE)
    return how


def push_all(client, output: ImageRef, origin: str, repo: str, images: list[PlatformImage],
             state) -> str:
    """Push the thin image of each platform; with several, an OCI index at the output
    reference ties them together. Returns the digest the reference now names."""
    thins = [build(origin, repo, image) for image in images]
    several = len(thins) > 1
    for thin_image in thins:
        home = state.blob_home(output.api_host, sha(thin_image.layer))
        mount = home if home and home != output.repository else None
        push(client, output, thin_image, mount, thin_image.digest if several else None)
        for blob in (thin_image.layer, thin_image.config):
            state.put_blob_home(output.api_host, sha(blob), output.repository)
    if not several:
        return thins[0].digest
    body = index(images, thins)
    client.put_manifest(output, output.tag or output.digest, body, INDEX_TYPE)
    return sha(body)


def password(environ=None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get(PASSWORD_ENV) or None
