"""Registry documents parsed into typed values at the trust boundary.

Every manifest, index, image config, tag list and token answer becomes one of these, checked
field by field against the OCI and distribution specs; a violation is a ``BadDocument`` naming
the document and the field (one line), which fails that image alone. Nothing downstream
indexes raw JSON from the network, and every name taken from a document (digest, tag,
platform) is checked against its grammar before it can reach a path.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field

from ..errors import BadDocument, sanitize
from ..reference import PLATFORM_PART, Platform, is_digest, is_tag

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEXES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX))
CONFIG_TYPES = ("application/vnd.docker.container.image.v1+json",
                "application/vnd.oci.image.config.v1+json")

MAX_MANIFEST = 4 << 20          # the spec's "at least 4 MB" that registries accept
MAX_CONFIG = 8 << 20
MAX_TAG_PAGE = 4 << 20
MAX_TOKEN = 64 << 10
MAX_LAYERS = 1000
MAX_ENTRIES = 1000              # manifests in one index
MAX_TOKEN_LIFE = 86400.0

_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE = re.compile(rf"^{_NAME}/{_NAME}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the tool uses, checked."""

    os: str
    architecture: str
    variant: str
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        return str(Platform(self.os, self.architecture, self.variant))


@dataclass(frozen=True)
class TokenAnswer:
    token: str
    lifetime: float


class _Checker:
    """Field access on one decoded document, each violation one line naming the field."""

    def __init__(self, what: str):
        self.what = what

    def fail(self, where: str, why: str) -> BadDocument:
        return BadDocument(f"{self.what}: {where}: {why}")

    def get(self, doc: dict, key: str, kind, where: str, required: bool = False):
        value = doc.get(key)
        if value is None:
            if required:
                raise self.fail(where, "missing")
            return None
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(where, f"must be an integer, got {sanitize(repr(value), 40)}")
        if kind is not int and not isinstance(value, kind):
            raise self.fail(where, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, doc: dict, key: str, where: str, required: bool = False, limit: int = 4096):
        value = self.get(doc, key, str, where, required)
        if value is not None and (len(value) > limit or "\0" in value):
            raise self.fail(where, f"longer than {limit} characters or holds NUL")
        return value

    def strings(self, doc: dict, key: str, where: str,
                limit: int = 10000) -> tuple[str, ...] | None:
        value = self.get(doc, key, list, where)
        if value is None:
            return None
        if len(value) > limit:
            raise self.fail(where, f"more than {limit} entries")
        for i, item in enumerate(value):
            if not isinstance(item, str) or "\0" in item:
                raise self.fail(f"{where}[{i}]", "must be a string")
        return tuple(value)

    def digest(self, doc: dict, key: str, where: str) -> str:
        value = self.get(doc, key, str, where, required=True)
        if not is_digest(value):
            raise self.fail(where, f"{sanitize(value, 80)!r} is not a sha256/sha512 digest")
        return value


def _kind_name(kind) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def decode(body: bytes, what: str, limit: int) -> dict:
    """Bytes -> a JSON object, refusing oversized, non-JSON, non-finite or non-object input."""
    if len(body) > limit:
        raise BadDocument(f"{what}: larger than {limit:,} bytes; refused")
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise BadDocument(f"{what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadDocument(f"{what}: not a JSON object")
    return doc


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def descriptor(check: _Checker, doc: object, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise check.fail(where, "must be an object")
    media_type = check.text(doc, "mediaType", f"{where}.mediaType", required=True, limit=255)
    if not MEDIA_TYPE.match(media_type):
        raise check.fail(f"{where}.mediaType", f"{sanitize(media_type, 80)!r} is not a media type")
    digest = check.digest(doc, "digest", f"{where}.digest")
    size = check.get(doc, "size", int, f"{where}.size", required=True)
    if size < 0:
        raise check.fail(f"{where}.size", "must not be negative")
    urls = check.strings(doc, "urls", f"{where}.urls", limit=16) or ()
    for i, url in enumerate(urls):
        if not url.startswith(("https://", "http://")) or len(url) > 2048:
            raise check.fail(f"{where}.urls[{i}]", "must be an http(s) URL")
    platform = None
    raw = check.get(doc, "platform", dict, f"{where}.platform")
    if raw is not None:
        parts = [check.text(raw, k, f"{where}.platform.{k}", required=k != "variant", limit=64)
                 or "" for k in ("os", "architecture", "variant")]
        for name, part in zip(("os", "architecture", "variant"), parts, strict=True):
            if part and not PLATFORM_PART.match(part):
                raise check.fail(f"{where}.platform.{name}", f"{sanitize(part, 40)!r} is not a "
                                 "platform name")
        platform = Platform(*parts)
    notes = check.get(doc, "annotations", dict, f"{where}.annotations") or {}
    annotations = tuple(sorted((k, v) for k, v in notes.items()
                               if isinstance(k, str) and isinstance(v, str)))
    return Descriptor(media_type, digest, size, urls, platform, annotations)


def media_type_of(body: bytes, header: str, what: str) -> str:
    """What a manifest response is: the document's own mediaType, the Content-Type, or
    (for documents that name neither) its shape."""
    doc = decode(body, what, MAX_MANIFEST)
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise BadDocument(f"{what}: mediaType must be a string")
    header = header.split(";")[0].strip()
    known = MANIFESTS + INDEXES + SCHEMA1
    if declared and header in known and declared != header:
        raise BadDocument(f"{what}: Content-Type {header} disagrees with mediaType "
                          f"{sanitize(declared, 80)}")
    found = declared or header
    if found in known:
        return found
    if doc.get("schemaVersion") == 1:
        return SCHEMA1[0]
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return sanitize(found or "unknown", 80)


def _schema2(check: _Checker, doc: dict) -> None:
    version = check.get(doc, "schemaVersion", int, "schemaVersion", required=True)
    if version != 2:
        raise check.fail("schemaVersion", f"must be 2, got {version}")


def parse_manifest(body: bytes, media_type: str, what: str) -> Manifest:
    check = _Checker(what)
    doc = decode(body, what, MAX_MANIFEST)
    _schema2(check, doc)
    config = descriptor(check, check.get(doc, "config", dict, "config", required=True), "config")
    layers = check.get(doc, "layers", list, "layers", required=True)
    if len(layers) > MAX_LAYERS:
        raise check.fail("layers", f"{len(layers)} layers, more than {MAX_LAYERS}")
    return Manifest(media_type, config,
                    tuple(descriptor(check, x, f"layers[{i}]") for i, x in enumerate(layers)))


def parse_index(body: bytes, media_type: str, what: str) -> Index:
    check = _Checker(what)
    doc = decode(body, what, MAX_MANIFEST)
    _schema2(check, doc)
    entries = check.get(doc, "manifests", list, "manifests", required=True)
    if len(entries) > MAX_ENTRIES:
        raise check.fail("manifests", f"{len(entries)} entries, more than {MAX_ENTRIES}")
    return Index(media_type,
                 tuple(descriptor(check, x, f"manifests[{i}]") for i, x in enumerate(entries)))


def parse_config(body: bytes, what: str) -> ImageConfig:
    check = _Checker(what)
    doc = decode(body, what, MAX_CONFIG)
    parts = []
    for key in ("os", "architecture", "variant"):
        value = check.text(doc, key, key, required=key != "variant", limit=64) or ""
        if value and not PLATFORM_PART.match(value):
            raise check.fail(key, f"{sanitize(value, 40)!r} is not a platform name")
        parts.append(value)
    rootfs = check.get(doc, "rootfs", dict, "rootfs", required=True)
    if rootfs.get("type") != "layers":
        got = sanitize(repr(rootfs.get("type")), 40)
        raise check.fail("rootfs.type", f"must be 'layers', got {got}")
    diff_ids = check.strings(rootfs, "diff_ids", "rootfs.diff_ids", limit=MAX_LAYERS) or ()
    for i, diff_id in enumerate(diff_ids):
        if not is_digest(diff_id):
            raise check.fail(f"rootfs.diff_ids[{i}]", "is not a sha256/sha512 digest")
    inner = check.get(doc, "config", dict, "config") or {}
    labels = check.get(inner, "Labels", dict, "config.Labels") or {}
    for key, value in labels.items():
        if not key or not isinstance(value, str) or len(key) > 1024 or "\0" in key + value:
            raise check.fail(f"config.Labels[{sanitize(key, 40)!r}]", "must map a name to a string")
    return ImageConfig(
        os=parts[0], architecture=parts[1], variant=parts[2], diff_ids=diff_ids,
        env=check.strings(inner, "Env", "config.Env") or (),
        entrypoint=check.strings(inner, "Entrypoint", "config.Entrypoint"),
        cmd=check.strings(inner, "Cmd", "config.Cmd"),
        working_dir=check.text(inner, "WorkingDir", "config.WorkingDir") or "",
        user=check.text(inner, "User", "config.User", limit=256) or "",
        labels=dict(labels))


def parse_tag_list(body: bytes, what: str) -> tuple[list[str], list[str], int]:
    """(tags that are valid, up to 20 names that are not, how many names) of one
    ``tags/list`` page."""
    check = _Checker(what)
    doc = decode(body, what, MAX_TAG_PAGE)
    tags = check.get(doc, "tags", list, "tags") or []
    good = [t for t in tags if is_tag(t)]
    refused = (t for t in tags if not is_tag(t))
    bad = [sanitize(repr(t), 60) for t in itertools.islice(refused, 20)]
    return good, bad, len(tags)


def parse_token(body: bytes, what: str) -> TokenAnswer:
    """A token server's answer: a printable token and a finite, bounded lifetime."""
    check = _Checker(what)
    doc = decode(body, what, MAX_TOKEN)
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise check.fail("token", "missing")
    if len(token) > 16384 or not token.isascii() or not token.isprintable() or " " in token:
        raise check.fail("token", "is not a printable header value")
    lifetime = doc.get("expires_in", 60)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) \
            or (isinstance(lifetime, float) and not math.isfinite(lifetime)):
        raise check.fail("expires_in", "must be a number of seconds")
    return TokenAnswer(token, float(min(max(lifetime, 1), MAX_TOKEN_LIFE)))
