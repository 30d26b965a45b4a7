"""Test images written in Python (tar layers, OCI layouts) and pushed with skopeo.

skopeo is an independent client: our pull code is never tested against our own push code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Entry:
    """One tar entry; ``kind`` is file, dir, symlink, hardlink, fifo, char, block."""

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int | None = None
    link: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    pax: dict = field(default_factory=dict)


TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
         "block": tarfile.BLKTYPE}


def tar_bytes(entries: list[Entry], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = TYPES[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.linkname = e.link
            info.pax_headers = dict(e.pax)
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(raw: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(raw, mtime=0), OCI_LAYER + "+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(raw), OCI_LAYER + "+zstd"
    return raw, OCI_LAYER


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: list[str]          # compressed blob digests, bottom first
    diff_ids: list[str]
    config: dict


class Layout:
    """An OCI image layout on disk that skopeo can copy from."""

    def __init__(self, path: Path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index_path = path / "index.json"
        if not self.index_path.exists():
            self.index_path.write_text(json.dumps({"schemaVersion": 2, "manifests": []}))

    def blob(self, data: bytes) -> str:
        digest = sha(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def _tag(self, descriptor: dict, tag: str) -> None:
        index = json.loads(self.index_path.read_text())
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                              != tag]
        descriptor = dict(descriptor, annotations={"org.opencontainers.image.ref.name": tag})
        index["manifests"].append(descriptor)
        self.index_path.write_text(json.dumps(index))

    def image(self, tag: str, layers: list[bytes], how: str = "gzip", config: dict | None = None,
              arch: str = "amd64", variant: str | None = None, tagged: bool = True) -> Image:
        blobs, diff_ids, descs = [], [], []
        for raw in layers:
            data, media_type = compress(raw, how)
            digest = self.blob(data)
            blobs.append(digest)
            diff_ids.append(sha(raw))
            descs.append({"mediaType": media_type, "digest": digest, "size": len(data)})
        cfg = {"architecture": arch, "os": "linux",
               "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
               "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": []}
        if variant:
            cfg["variant"] = variant
        if config:
            cfg["config"].update(config)
        cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
        cfg_digest = self.blob(cfg_bytes)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cfg_digest, "size": len(cfg_bytes)},
                    "layers": descs}
        m_bytes = json.dumps(manifest).encode()
        m_digest = self.blob(m_bytes)
        if tagged:
            self._tag({"mediaType": manifest["mediaType"], "digest": m_digest,
                       "size": len(m_bytes)}, tag)
        return Image(self.path, tag, m_digest, cfg_digest, blobs, diff_ids, cfg)

    def index(self, tag: str, images: list[Image], attestation: bool = True) -> str:
        """An OCI index over ``images`` (plus a BuildKit-style attestation entry first)."""
        entries = []
        if attestation:
            cfg = b'{"architecture":"unknown","os":"unknown","rootfs":{"type":"layers"}}'
            statement = b'{"_type":"https://in-toto.io/Statement/v0.1"}'
            att_manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": self.blob(cfg), "size": len(cfg)},
                "layers": [{"mediaType": "application/vnd.in-toto+json",
                            "digest": self.blob(statement), "size": len(statement)}]}).encode()
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": self.blob(att_manifest), "size": len(att_manifest),
                            "platform": {"architecture": "unknown", "os": "unknown"},
                            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
        for img in images:
            data = (self.path / "blobs" / "sha256" / img.manifest_digest[7:]).read_bytes()
            platform = {"architecture": img.config["architecture"], "os": "linux"}
            if img.config.get("variant"):
                platform["variant"] = img.config["variant"]
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": img.manifest_digest, "size": len(data),
                            "platform": platform})
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": entries}
        data = json.dumps(index).encode()
        digest = self.blob(data)
        self._tag({"mediaType": index["mediaType"], "digest": digest, "size": len(data)}, tag)
        return digest


def skopeo_copy(layout: Path, tag: str, dest: str, creds: str | None = None,
                all_images: bool = False) -> None:
    """Push ``oci:layout:tag`` to ``dest`` (``host:port/repo:tag``) with skopeo."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
    if creds:
        cmd += ["--dest-creds", creds]
    if all_images:
        cmd += ["--all"]
    cmd += [f"oci:{layout}:{tag}", f"docker://{dest}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
