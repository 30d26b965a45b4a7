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
from ..registry.resolved import Resolved

VERSION = 1                   # bump when the bytes below change: every thin image is re-pushed
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PASSWORD_ENV = "DUCC_OUTPUT_REGISTRY_PASS"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def thin_json(origin: str, repo: str, resolved: Resolved) -> bytes:
    layers = [{"digest": x.digest.partition(":")[2],
               "url": f"cvmfs://{repo}/.layers/{x.digest.partition(':')[2]}/layerfs"}
              for x in resolved.layers]
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


def build(origin: str, repo: str, resolved: Resolved) -> ThinImage:
    """The thin image of ``resolved`` as converted into ``repo`` (``origin``: the input)."""
    thin = thin_json(origin, repo, resolved)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("thin.json")
        info.size, info.mode, info.mtime = len(thin), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(thin))
    tar_bytes = raw.getvalue()
    layer = gzip.compress(tar_bytes, compresslevel=9, mtime=0)
    source = resolved.config_json
    cfg = source.get("config") or {}
    env = [e for e in cfg.get("Env") or [] if not e.startswith("CVMFS_IMAGE=")]
    inner = {"Env": env + ["CVMFS_IMAGE=true"]}
    for key in ("Entrypoint", "Cmd", "WorkingDir", "User", "Labels"):
        if cfg.get(key):
            inner[key] = cfg[key]
    config = _json({"architecture": source.get("architecture", "amd64"),
                    "os": source.get("os", "linux"), "config": inner,
                    "rootfs": {"type": "layers", "diff_ids": [sha(tar_bytes)]},
                    "history": [{"created_by": f"unpacked thin image of {origin}"}]})
    manifest = _json({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                      "config": {"mediaType": CONFIG_TYPE, "size": len(config),
                                 "digest": sha(config)},
                      "layers": [{"mediaType": LAYER_TYPE, "size": len(layer),
                                  "digest": sha(layer)}]})
    return ThinImage(manifest, config, layer, thin)


def key(origin: str, repo: str, output: str, resolved: Resolved) -> str:
    """What decides a thin image's bytes and destination, hashed (for up-to-date checks)."""
    cfg = resolved.config_json
    inner = cfg.get("config") or {}
    parts = [VERSION, origin, repo, output, [x.digest for x in resolved.layers],
             {k: inner.get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User",
                                        "Labels")},
             cfg.get("os"), cfg.get("architecture")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def push(client, output: ImageRef, image: ThinImage, mount_from: str | None = None) -> dict:
    """Push blobs (HEAD first, cross-repo mount when known, else upload), then the manifest."""
    how = {"layer": client.push_blob(output, image.layer, sha(image.layer), mount_from),
           "config": client.push_blob(output, image.config, sha(image.config), mount_from)}
    reference = output.tag or output.digest
    client.put_manifest(output, reference, image.manifest, MANIFEST_TYPE)
    return how


def password(environ=None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get(PASSWORD_ENV) or None
