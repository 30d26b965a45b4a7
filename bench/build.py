"""Benchmark images: built once with debootstrap, plain tar and isal, pushed with skopeo.

Everything lands under ``bench/images/`` (git-ignored): OCI layouts, and the storage folder
of the benchmark's own ``docker-registry``, so later runs only start the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from isal import igzip

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers.images import skopeo_copy  # noqa: E402

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Writer:
    """An OCI layout written blob by blob, streaming (layers can be larger than memory)."""

    def __init__(self, path: Path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index = path / "index.json"
        if not self.index.exists():
            self.index.write_text(json.dumps({"schemaVersion": 2, "manifests": []}))

    def blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def layer(self, fill) -> dict:
        """Write a gzip layer from ``fill(tar)``; returns its descriptor and diff_id."""
        tmp = self.path / "blobs" / ".partial"
        raw_hash = hashlib.sha256()

        class Hashing(io.RawIOBase):
            def __init__(self, inner):
                self.inner = inner

            def writable(self):
                return True

            def write(self, b):
                raw_hash.update(b)
                return self.inner.write(b)

        with (open(tmp, "wb") as out,
              igzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz,
              tarfile.open(fileobj=Hashing(gz), mode="w|", format=tarfile.PAX_FORMAT) as tar):
            fill(tar)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = tmp.stat().st_size
        tmp.rename(self.path / "blobs" / "sha256" / digest[7:])
        return {"mediaType": LAYER, "digest": digest, "size": size,
                "diff_id": "sha256:" + raw_hash.hexdigest()}

    def image(self, tag: str, layers: list[dict], env: list[str] | None = None) -> None:
        cfg = {"architecture": "amd64", "os": "linux",
               "config": {"Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"],
                          "Cmd": ["/bin/sh"]},
               "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]}}
        config = self.blob(json.dumps(cfg, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                    "layers": [{k: x[k] for k in ("mediaType", "digest", "size")}
                               for x in layers]}
        desc = self.blob(json.dumps(manifest).encode())
        index = json.loads(self.index.read_text())
        index["manifests"] = [m for m in index["manifests"]
                              if m["annotations"]["org.opencontainers.image.ref.name"] != tag]
        index["manifests"].append({"mediaType": manifest["mediaType"], **desc,
                                   "annotations": {"org.opencontainers.image.ref.name": tag}})
        self.index.write_text(json.dumps(index))


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
    tar.addfile(info)


def debootstrap_tar(work: Path) -> Path:
    """A Debian bookworm minbase root filesystem as a tar (cached)."""
    archive = work / "bookworm-minbase.tar"
    if archive.exists():
        return archive
    root = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], check=True,
                   capture_output=True, timeout=3600)
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(archive) + ".part",
                    "."], check=True)
    Path(str(archive) + ".part").rename(archive)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    return archive


def base_layer(w: Writer, work: Path, quick: bool) -> dict:
    if quick:
        def fill(tar):
            for d in ("etc", "usr", "usr/bin", "usr/share", "usr/share/doc", "etc/apt", "bin"):
                add_dir(tar, d)
            for i in range(200):
                add_file(tar, f"usr/share/doc/pkg{i}/README", b"doc " * 50)
            add_file(tar, "etc/apt/sources.list", b"deb http://deb.debian.org/debian bookworm\n")
            add_file(tar, "bin/sh", b"#!fake\n", 0o755)
        return w.layer(fill)
    archive = debootstrap_tar(work)

    def fill(tar):
        with tarfile.open(archive) as src:
            for member in src:
                tar.addfile(member, src.extractfile(member) if member.isfile() else None)
    return w.layer(fill)


def small_files_layer(w: Writer, count: int, seed: int = 1) -> dict:
    """Tens of thousands of small files, with the text of Python's standard library."""
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_bytes()[:8192] for p in sorted(stdlib.glob("*.py"))[:200]]
    rng = random.Random(seed)

    def fill(tar):
        add_dir(tar, "opt")
        add_dir(tar, "opt/lib")
        for d in range(max(1, count // 100)):
            add_dir(tar, f"opt/lib/pkg{d:04d}")
            for i in range(100):
                text = texts[rng.randrange(len(texts))]
                add_file(tar, f"opt/lib/pkg{d:04d}/mod{i:03d}.py", text[:rng.randrange(200,
                                                                                         8192)])
    return w.layer(fill)


def delete_layer(w: Writer) -> dict:
    """Deletes a subtree (whiteout) and makes a folder opaque."""
    def fill(tar):
        add_dir(tar, "usr")
        add_dir(tar, "usr/share")
        add_file(tar, "usr/share/.wh.doc", b"")
        add_dir(tar, "etc")
        add_dir(tar, "etc/apt")
        add_file(tar, "etc/apt/.wh..wh..opq", b"")
        add_file(tar, "etc/apt/sources.list", b"deb http://deb.debian.org/debian bookworm main\n")
    return w.layer(fill)


def big_file_layer(w: Writer, size: int) -> dict:
    """One large, poorly compressible file."""
    def fill(tar):
        info = tarfile.TarInfo("data/big.bin")
        info.size, info.mode, info.mtime = size, 0o644, 1_600_000_000
        block = os.urandom(1 << 20)
        pos = [0]

        class Source(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), size - pos[0], len(block))
                b[:n] = block[:n]
                pos[0] += n
                return n
        add_dir(tar, "data")
        tar.addfile(info, io.BufferedReader(Source(), 1 << 20))
    return w.layer(fill)


def tiny_layer(w: Writer, i: int, j: int) -> dict:
    def fill(tar):
        add_file(tar, f"l{j}/file{i}.txt", f"image {i} layer {j}\n".encode())
    return w.layer(fill)


def wide_layers(w: Writer, count: int, files: int) -> list[dict]:
    """``count`` layers as a long Dockerfile makes them: each adds a package's files and a
    larger binary; every fifth removes an earlier package and rewrites a shared file."""
    rng = random.Random(40)
    layers = []
    for j in range(count):
        def fill(tar, j=j):
            add_dir(tar, "opt")
            add_dir(tar, f"opt/pkg{j:02d}")
            for i in range(files):
                add_file(tar, f"opt/pkg{j:02d}/f{i:04d}", rng.randbytes(rng.randrange(1024,
                                                                                       16384)))
            add_file(tar, f"opt/pkg{j:02d}/bin", rng.randbytes(2 << 20 if files > 50 else 4096),
                     0o755)
            add_dir(tar, "etc")
            add_file(tar, "etc/shared.conf", f"written by layer {j}\n".encode())
            if j % 5 == 4:
                add_file(tar, f"opt/.wh.pkg{j - 2:02d}", b"")
        layers.append(w.layer(fill))
    return layers


def files_layer(w: Writer, count: int) -> dict:
    """One layer of ``count`` small files, a hundred to a folder."""
    rng = random.Random(300)

    def fill(tar):
        add_dir(tar, "data")
        for d in range(count // 100):
            add_dir(tar, f"data/d{d:05d}")
            for i in range(100):
                add_file(tar, f"data/d{d:05d}/f{i:02d}", rng.randbytes(rng.randrange(50, 400)))
    return w.layer(fill)


def build_all(images: Path, registry_host: str, quick: bool, many: int) -> dict:
    """Build and push every benchmark image (skipped when the registry already has them)."""
    stamp = images / ("ready-quick.json" if quick else "ready.json")
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if len(info.get("many", [])) >= many and "variants2" in info and \
                len(info.get("many2", [])) >= min(many, 1000):
            return info
    else:
        info = {}
    work = images / "work"
    work.mkdir(parents=True, exist_ok=True)
    w = Writer(images / ("layout-quick" if quick else "layout"))
    if "app_layers" not in info:
        base = base_layer(w, work, quick)
        w.image("base", [base])
        app_layers = [base, small_files_layer(w, 300 if quick else 30000), delete_layer(w),
                      big_file_layer(w, (8 << 20) if quick else (1 << 30))]
        w.image("app", app_layers)
        for v in range(5):
            def fill(tar, v=v):
                add_file(tar, f"variant/{v}.txt", f"variant {v}\n".encode() * 100)
            w.image(f"variant{v}", [base, w.layer(fill)])
        wide = wide_layers(w, 40, 20 if quick else 500)
        w.image("wide", wide)
        files = files_layer(w, 3000 if quick else 300_000)
        w.image("files", [files])
        pushes = [("base", "bench/base:v1"), ("app", "bench/app:v1"), ("wide", "bench/wide:v1"),
                  ("files", "bench/files:v1")]
        pushes += [(f"variant{v}", f"bench/variants:variant{v}") for v in range(5)]
        for tag, target in pushes:
            skopeo_copy(w.path, tag, f"{registry_host}/{target}")
        info.update(app_layers=[x["digest"] for x in app_layers],
                    base_layers=[base["digest"]],
                    wide_layers=[x["digest"] for x in wide],
                    files_layers=[files["digest"]])
    if len(info.get("many", [])) < many:
        info["many"] = push_many(registry_host, many)
    if "variants2" not in info:
        info["variants2"] = push_variants2(registry_host)
    count = min(many, 1000)
    if len(info.get("many2", [])) < count:
        info["many2"] = push_many2(registry_host, info["many"][:count])
    stamp.write_text(json.dumps(info))
    return info


INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
AMD64 = {"os": "linux", "architecture": "amd64"}


class Pusher:
    """Blobs, manifests and indexes pushed to one repository over plain HTTP (set-up only)."""

    def __init__(self, host: str, repo: str):
        import requests
        self.host, self.repo = host, repo
        self.s = requests.Session()
        self.base = f"http://{host}/v2/{repo}"
        self.pushed: set[str] = set()

    def upload(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest not in self.pushed:
            r = self.s.post(f"{self.base}/blobs/uploads/")
            r.raise_for_status()
            loc = r.headers["Location"]
            loc = loc if loc.startswith("http") else f"http://{self.host}{loc}"
            self.s.put(loc + ("&" if "?" in loc else "?") + f"digest={digest}", data=data,
                       headers={"Content-Type": "application/octet-stream"}).raise_for_status()
            self.pushed.add(digest)
        return {"digest": digest, "size": len(data)}

    def mount(self, digest: str, source: str) -> None:
        """A blob of another repository of the registry, without copying it."""
        r = self.s.post(f"{self.base}/blobs/uploads/?mount={digest}&from={source}")
        if r.status_code != 201:
            raise RuntimeError(f"cannot mount {digest} from {source}: {r.status_code}")

    def layer(self, path: str, text: str) -> tuple[dict, str]:
        import gzip
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            add_file(tar, path, text.encode())
        diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
        return {"mediaType": LAYER, **self.upload(gzip.compress(raw.getvalue(), mtime=0))}, \
            diff_id

    def image(self, platform: dict, layers: list[tuple[dict, str]], tag: str = "") -> dict:
        """Push a config and a manifest (by digest, or at ``tag``); returns the manifest's
        descriptor for an index."""
        cfg = json.dumps({**{k: platform[k] for k in ("os", "architecture")},
                          **({"variant": platform["variant"]} if "variant" in platform else {}),
                          "config": {"Cmd": ["/bin/sh"]},
                          "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]}})
        config = self.upload(cfg.encode())
        doc = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                          "config": {"mediaType": CONFIG, **config},
                          "layers": [x for x, _ in layers]}).encode()
        digest = "sha256:" + hashlib.sha256(doc).hexdigest()
        self.put(tag or digest, doc, MANIFEST)
        return {"mediaType": MANIFEST, "digest": digest, "size": len(doc), "platform": platform}

    def fetch(self, repo: str, ref: str) -> tuple[bytes, dict]:
        r = self.s.get(f"http://{self.host}/v2/{repo}/manifests/{ref}",
                       headers={"Accept": MANIFEST})
        r.raise_for_status()
        return r.content, r.json()

    def put(self, ref: str, doc: bytes, media_type: str) -> None:
        self.s.put(f"{self.base}/manifests/{ref}", data=doc,
                   headers={"Content-Type": media_type}).raise_for_status()

    def index(self, tag: str, entries: list[dict]) -> None:
        self.put(tag, json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                                  "manifests": entries}).encode(), INDEX)


def push_variants2(host: str) -> list[str]:
    """The five variants as two-platform images: amd64 is the variant as it is; arm64 has a
    base of its own (the app's 30,000 small files stand in for it) and a layer of its own."""
    p = Pusher(host, "bench/variants2")
    _, app = p.fetch("bench/app", "v1")
    app_config = p.s.get(f"http://{host}/v2/bench/app/blobs/{app['config']['digest']}").json()
    arm_base = (app["layers"][1], app_config["rootfs"]["diff_ids"][1])
    p.mount(arm_base[0]["digest"], "bench/app")
    tags = []
    for v in range(5):
        raw, doc = p.fetch("bench/variants", f"variant{v}")
        for blob in [doc["config"], *doc["layers"]]:
            p.mount(blob["digest"], "bench/variants")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        p.put(digest, raw, MANIFEST)
        amd = {"mediaType": MANIFEST, "digest": digest, "size": len(raw), "platform": AMD64}
        arm = p.image(ARM64, [arm_base, p.layer(f"variant/{v}.txt", f"arm64 variant {v}\n")])
        p.index(f"variant{v}", [amd, arm])
        tags.append(f"variant{v}")
    return tags


def push_many2(host: str, single: list[str]) -> list[str]:
    """``many`` again as two-platform images (tags ``m<i>``): amd64 is the image ``t<i>``,
    arm64 five tiny layers of its own, shared across images as amd64's are."""
    p = Pusher(host, "bench/many")
    tags = []
    for i, tag in enumerate(single):
        raw, _ = p.fetch("bench/many", tag)
        amd = {"mediaType": MANIFEST, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
               "size": len(raw), "platform": AMD64}
        layers = [p.layer("base/os-release", f"arm base {i % 10}\n"),
                  p.layer("mid/runtime", f"arm runtime {i % 100}\n")]
        layers += [p.layer(f"l{j}/file{i}.txt", f"arm image {i} layer {j}\n")
                   for j in range(2, 5)]
        p.index(f"m{tag[1:]}", [amd, p.image(ARM64, layers)])
        tags.append(f"m{tag[1:]}")
    return tags


def push_many(host: str, count: int) -> list[str]:
    """``count`` tags of one repository, each its own image of 5 tiny layers: the first
    shared by a tenth of the images, the second by a hundredth, three of its own (as images
    built on a few common bases are). Pushed over plain HTTP, as setup: the thing measured is
    the conversion, not this; blobs already pushed are not pushed again."""
    p = Pusher(host, "bench/many")
    tags = []
    for i in range(count):
        made = [p.layer("base/os-release", f"base {i % 10}\n"),
                p.layer("mid/runtime", f"runtime {i % 100}\n")]
        made += [p.layer(f"l{j}/file{i}.txt", f"image {i} layer {j}\n") for j in range(2, 5)]
        tag = f"t{i:05d}"
        p.image(AMD64, made, tag)
        tags.append(tag)
    return tags
