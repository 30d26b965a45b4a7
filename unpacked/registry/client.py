"""The registry client: one pooled session, verified manifests and configs, streamed blobs.

Nothing is trusted before it is verified: manifest bytes against their digest, the config
against its descriptor, and every blob against its digest and size at the end of its stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import urljoin

import requests
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from ..errors import DigestMismatch, NotFound, RegistryError, Unauthorized, Unsupported
from ..reference import ImageRef
from . import platform as platforms
from .auth import RegistryAuth, TokenStore, find_credential
from .resolved import Layer, Resolved
from .retry import RetryAdapter, RetryPolicy, retry_after, retryable_status

log = logging.getLogger(__name__)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFESTS = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
INDEXES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join(MANIFESTS)
CONFIG_TYPES = ("application/vnd.docker.container.image.v1+json",
                "application/vnd.oci.image.config.v1+json")
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 32 << 20
CHUNK = 256 << 10
PROGRESS_SECONDS = 10.0
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_STREAM_ERRORS = (requests.RequestException, Urllib3Error, OSError)


def hasher(digest: str):
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise Unsupported(f"digest algorithm {algorithm!r} of {digest} is not supported")
    return hashlib.new(algorithm)


def verify(data: bytes, digest: str, what: str) -> None:
    h = hasher(digest)
    h.update(data)
    got = f"{digest.partition(':')[0]}:{h.hexdigest()}"
    if got != digest:
        raise DigestMismatch(f"{what}: content hashes to {got}, expected {digest}; refused")


def _error_text(resp: requests.Response) -> tuple[str | None, str]:
    """The registry's error code and message, from its JSON body when it sent one."""
    try:
        errors = resp.json().get("errors") or []
        first = errors[0]
        return first.get("code"), first.get("message") or ""
    except (ValueError, AttributeError, IndexError, TypeError):
        text = resp.text.strip().replace("\n", " ")[:200] if resp.request.method != "HEAD" else ""
        return None, text


class RegistryClient:
    """All requests to registries go through here: one session, auth and retries attached once."""

    def __init__(self, cache_dir: Path | None = None, policy: RetryPolicy | None = None,
                 timeout: float = 60.0, credentials=find_credential, pool: int = 16):
        self.policy = policy or RetryPolicy()
        self.timeout = (min(timeout, 30.0), timeout)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "unpacked/0.1 (+cvmfs)"
        # requests re-reads proxies and ~/.netrc from the environment on every request (a
        # third of a HEAD's cost): only when a proxy is set; the CA bundle is read here once.
        self.session.trust_env = any(os.environ.get(v) or os.environ.get(v.lower())
                                     for v in PROXY_VARIABLES)
        if not self.session.trust_env:
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle:
                self.session.verify = bundle
        adapter = RetryAdapter(self.policy, pool_connections=pool, pool_maxsize=pool)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        tokens = TokenStore(cache_dir / "tokens" if cache_dir else None)
        self.auth = RegistryAuth(self.session, tokens, credentials, self.timeout)

        self._fast: urllib3.PoolManager | None = None
        if not self.session.trust_env:
            verify = self.session.verify
            ca = verify if isinstance(verify, str) else requests.certs.where()
            self._fast = urllib3.PoolManager(num_pools=pool, maxsize=pool, ca_certs=ca,
                                             cert_reqs="CERT_REQUIRED", retries=False,
                                             timeout=urllib3.Timeout(*self.timeout))

    def close(self) -> None:
        self.session.close()
        if self._fast is not None:
            self._fast.clear()

    def _fast_head(self, url: str) -> tuple[int | None, str | None]:
        """A HEAD without requests' machinery (a third of its cost): the common case of a
        re-resolve. Returns (status, digest); anything unusual (401, errors) makes the caller
        take the full path, with its retries, auth answers and error messages."""
        if self._fast is None:
            return None, None
        headers = {"Accept": ACCEPT, "User-Agent": self.session.headers["User-Agent"]}
        auth = self.auth.known_header(url, "HEAD")
        if auth:
            headers["Authorization"] = auth
        try:
            resp = self._fast.request("HEAD", url, headers=headers, redirect=False)
        except Urllib3Error:
            return None, None
        if retryable_status(resp.status):
            # the full path retries; wait as it would have, so Retry-After is honoured
            delay = retry_after(resp.headers.get("Retry-After"))
            delay = self.policy.backoff(1) if delay is None else delay
            if delay <= self.policy.seconds:      # beyond the budget the full path gives up
                time.sleep(delay)
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None:
            log.info("%s ratelimit-remaining %s", url.split("/v2/")[0], remaining)
        return resp.status, resp.headers.get("Docker-Content-Digest")

    # -- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, ref: ImageRef, path: str, what: str, *,
                headers: dict | None = None, stream: bool = False, ok=(200,),
                url: str | None = None, **kwargs) -> requests.Response:
        """One request to ``/v2/<repository>/<path>``; a failure becomes a one-line error."""
        url = url or f"{ref.base_url}/v2/{ref.repository}/{path}"
        try:
            resp = self.session.request(method, url, headers=headers, stream=stream,
                                        timeout=self.timeout, auth=self.auth, **kwargs)
        except Unauthorized:
            raise
        except requests.RequestException as exc:
            raise RegistryError(f"{what}: cannot reach {ref.api_host}: {_short(exc)}") from None
        if resp.status_code in ok:
            return resp
        raise self.error(resp, ref, what)

    def error(self, resp: requests.Response, ref: ImageRef, what: str) -> RegistryError:
        code, message = _error_text(resp)
        resp.close()
        answer = f"{resp.status_code} {code or resp.reason or ''}".strip()
        if message:
            answer += f": {message}"
        if resp.status_code == 401 or code in ("UNAUTHORIZED", "DENIED"):
            who = self.auth.credential(ref.api_host)
            as_ = f" as {who.identity}" if who else " anonymously"
            return Unauthorized(f"unauthorized for {ref.registry}/{ref.repository}{as_}: "
                                f"registry answered {answer}", resp.status_code, code)
        if resp.status_code == 404:
            return NotFound(f"{what}: registry answered {answer}", 404, code)
        if resp.status_code == 429:
            wait = resp.headers.get("Retry-After")
            return RegistryError(f"{what}: rate limited, registry answered {answer}"
                                 + (f" (Retry-After {wait})" if wait else ""), 429, code)
        return RegistryError(f"{what}: registry answered {answer}", resp.status_code, code)

    # -- manifests ----------------------------------------------------------------------------

    def head_manifest(self, ref: ImageRef, reference: str) -> str | None:
        """The digest a tag points at (one HEAD, not counted as a pull), or None if unsaid."""
        what = f"manifest {ref.registry}/{ref.repository}:{reference}"
        status, digest = self._fast_head(f"{ref.base_url}/v2/{ref.repository}/manifests/"
                                         f"{reference}")
        if status == 200 and digest:
            return digest
        if status == 404:
            self.get_manifest(ref, reference)      # the GET carries the registry's reason
            raise NotFound(f"{what}: registry answered 404", 404)
        try:
            resp = self.request("HEAD", ref, f"manifests/{reference}", what,
                                headers={"Accept": ACCEPT})
        except RegistryError as exc:
            if exc.status in (401, 404) or exc.status is None:
                # HEAD has no body: ask again with GET so the user sees the registry's reason.
                self.get_manifest(ref, reference)
            raise
        return resp.headers.get("Docker-Content-Digest")

    def get_manifest(self, ref: ImageRef, reference: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of a manifest, verified against its digest."""
        sep = "@" if ":" in reference else ":"
        what = f"manifest {ref.registry}/{ref.repository}{sep}{reference}"
        resp = self.request("GET", ref, f"manifests/{reference}", what,
                            headers={"Accept": ACCEPT}, stream=True)
        body = _read_limited(resp, MAX_MANIFEST, what)
        header_digest = resp.headers.get("Docker-Content-Digest")
        digest = reference if sep == "@" else header_digest
        if digest is None:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
        verify(body, digest, what)
        if header_digest and header_digest != digest and header_digest.startswith("sha256:") \
                and digest.startswith("sha256:"):
            raise DigestMismatch(f"{what}: registry says {header_digest}, content is {digest}")
        return body, _media_type(resp, body, what), digest

    def resolve(self, ref: ImageRef, wanted: str,
                known: Resolved | None = None) -> Resolved:
        """Resolve a tag or digest to its platform manifest and config, verified.

        With ``known`` (the last result for this input) an unchanged tag costs one HEAD.
        """
        top = ref.digest or self.head_manifest(ref, ref.tag)
        if known is not None and top is not None and known.top_digest == top \
                and known.platform == wanted:
            return known
        body, media_type, digest = self.get_manifest(ref, top or ref.tag)
        top = digest if top is None else top
        want = platforms.Platform.parse(wanted)
        for _depth in range(4):
            if media_type not in INDEXES:
                break
            index = _json(body, f"index {digest} of {ref}")
            entry = platforms.choose(index, want)
            if entry is None:
                offers = ", ".join(platforms.available(index)) or "none"
                raise NotFound(f"{ref}: no image for platform {want} in index {digest} "
                               f"(offers: {offers})")
            body, media_type, digest = self.get_manifest(ref, entry["digest"])
        if media_type in SCHEMA1:
            raise Unsupported(f"{ref}: Docker schema 1 manifest {digest} is not supported; "
                              "re-push the image with a current client")
        if media_type not in (DOCKER_MANIFEST, OCI_MANIFEST):
            raise Unsupported(f"{ref}: manifest {digest} has media type {media_type!r}, "
                              "not an image manifest")
        manifest = _json(body, f"manifest {digest} of {ref}")
        config_desc = manifest.get("config") or {}
        config_type = config_desc.get("mediaType")
        if config_type not in CONFIG_TYPES:
            raise Unsupported(f"{ref}: manifest {digest} is not a container image "
                              f"(config type {config_type!r})")
        config = self.get_config(ref, config_desc)
        config_json = _json(config, f"config {config_desc['digest']} of {ref}")
        rootfs = config_json.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") or []
        descriptors = manifest.get("layers") or []
        if rootfs.get("type") != "layers" or len(diff_ids) != len(descriptors):
            raise RegistryError(f"{ref}: config {config_desc['digest']} lists {len(diff_ids)} "
                                f"diff_ids for {len(descriptors)} layers (rootfs type "
                                f"{rootfs.get('type')!r})")
        pairs = zip(descriptors, diff_ids, strict=True)
        layers = [Layer(d["digest"], int(d.get("size", -1)), d.get("mediaType", ""), diff,
                        list(d.get("urls") or [])) for d, diff in pairs]
        for layer in layers:
            hasher(layer.digest)
        found = "/".join(p for p in (config_json.get("os"), config_json.get("architecture"),
                                     config_json.get("variant")) if p)
        log.debug("%s -> %s (%s)", ref, digest, found)
        return Resolved(ref.name, top, digest, media_type, body, config_desc["digest"], config,
                        layers, wanted, time.time())

    def get_config(self, ref: ImageRef, descriptor: dict) -> bytes:
        digest = descriptor["digest"]
        what = f"config {digest} of {ref}"
        resp = self.request("GET", ref, f"blobs/{digest}", what, stream=True)
        body = _read_limited(resp, MAX_CONFIG, what)
        verify(body, digest, what)
        return body

    # -- blobs and tags -----------------------------------------------------------------------

    def open_blob(self, ref: ImageRef, digest: str, size: int = -1,
                  url: str | None = None) -> BlobStream:
        """A verifying, resuming stream of one blob (``url``: a foreign layer's own address)."""
        return BlobStream(self, ref, digest, size, url)

    def tags(self, ref: ImageRef, page: int = 100) -> list[str]:
        """Every tag of a repository, following ``Link`` pagination."""
        what = f"tag list of {ref.registry}/{ref.repository}"
        url = f"{ref.base_url}/v2/{ref.repository}/tags/list?n={page}"
        tags: list[str] = []
        seen_urls = set()
        while url and url not in seen_urls:
            seen_urls.add(url)
            resp = self.request("GET", ref, "", what, url=url)
            try:
                tags.extend(resp.json().get("tags") or [])
            except (ValueError, AttributeError):
                raise RegistryError(f"{what}: registry sent no JSON tag list") from None
            nxt = resp.links.get("next", {}).get("url")
            url = urljoin(url, nxt) if nxt else None
        return tags


    # -- pushes -------------------------------------------------------------------------------

    def has_blob(self, ref: ImageRef, digest: str) -> bool:
        resp = self.request("HEAD", ref, f"blobs/{digest}", f"blob {digest} of {ref}",
                            ok=(200, 404))
        resp.close()
        return resp.status_code == 200

    def push_blob(self, ref: ImageRef, data: bytes, digest: str,
                  mount_from: str | None = None) -> str:
        """Put one blob: skipped if present, mounted from ``mount_from`` if possible, else
        uploaded in one request. Returns how: ``present``, ``mounted`` or ``uploaded``."""
        what = f"push of blob {digest} to {ref.registry}/{ref.repository}"
        if self.has_blob(ref, digest):
            return "present"
        query = f"?mount={digest}&from={mount_from}" if mount_from else ""
        resp = self.request("POST", ref, f"blobs/uploads/{query}", what, ok=(201, 202),
                            headers={"Content-Length": "0"})
        resp.close()
        if resp.status_code == 201:
            return "mounted"
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: the registry gave no upload location")
        url = urljoin(f"{ref.base_url}/v2/{ref.repository}/blobs/uploads/", location)
        url += ("&" if "?" in url else "?") + f"digest={digest}"
        done = self.request("PUT", ref, "", what, url=url, data=data, ok=(201,),
                            headers={"Content-Type": "application/octet-stream"})
        done.close()
        return "uploaded"

    def put_manifest(self, ref: ImageRef, reference: str, body: bytes, media_type: str) -> str:
        what = f"push of manifest {ref.registry}/{ref.repository}:{reference}"
        resp = self.request("PUT", ref, f"manifests/{reference}", what, data=body, ok=(201,),
                            headers={"Content-Type": media_type})
        resp.close()
        return resp.headers.get("Docker-Content-Digest", "")


class BlobStream(io.RawIOBase):
    """Reads one blob, resuming a dropped connection with ``Range``; verifies at EOF.

    Bytes are handed out as they arrive, so a consumer must not commit anything before the
    stream reached its end without error (``read`` returning ``b''``).
    """

    def __init__(self, client: RegistryClient, ref: ImageRef, digest: str, size: int,
                 url: str | None):
        self.client, self.ref, self.digest, self.size, self.url = client, ref, digest, size, url
        self.what = f"blob {digest} of {ref.registry}/{ref.repository}"
        self._hash = hasher(digest)
        self.received = 0
        self._resp: requests.Response | None = None
        self._skip = 0
        self._failures = 0
        self._verified = False
        self._next_report = time.monotonic() + PROGRESS_SECONDS
        self._open()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.received}-"} if self.received else {}
        if self.url:
            try:
                resp = self.client.session.get(self.url, headers=headers, stream=True,
                                               timeout=self.client.timeout)
            except requests.RequestException as exc:
                raise RegistryError(f"{self.what}: cannot fetch {self.url}: {_short(exc)}") \
                    from None
            if resp.status_code not in (200, 206):
                raise RegistryError(f"{self.what}: {self.url} answered {resp.status_code}")
        else:
            resp = self.client.request("GET", self.ref, f"blobs/{self.digest}", self.what,
                                       headers=headers, stream=True, ok=(200, 206))
        self._skip = 0
        if self.received:
            if resp.status_code == 206:
                start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if start != str(self.received):
                    resp.close()
                    raise RegistryError(f"{self.what}: resumed at the wrong offset "
                                        f"({resp.headers.get('Content-Range')!r})")
            else:
                self._skip = self.received       # 200: the whole blob again; skip what we have
            log.info("%s: resuming at byte %d", self.what, self.received)
        self._resp = resp

    def _retry(self, exc: BaseException) -> None:
        self._failures += 1
        if self._resp is not None:
            self._resp.close()
        if self._failures >= self.client.policy.attempts:
            raise RegistryError(f"{self.what}: transfer failed {self._failures} times, last: "
                                f"{_short(exc)}") from None
        log.warning("%s: transfer broke after %d bytes (%s), resuming", self.what,
                    self.received, _short(exc))
        time.sleep(self.client.policy.backoff(self._failures))
        self._open()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        while True:
            try:
                data = self._resp.raw.read(min(len(view), CHUNK), decode_content=False)
            except _STREAM_ERRORS as exc:
                self._retry(exc)
                continue
            if self._skip and data:
                cut = min(self._skip, len(data))
                self._skip -= cut
                data = data[cut:]
                if not data:
                    continue
            if not data:
                if self._skip or (self.size >= 0 and self.received < self.size):
                    self._retry(EOFError(f"connection closed at byte {self.received}"))
                    continue
                self._finish()
                return 0
            if 0 <= self.size < self.received + len(data):
                raise DigestMismatch(f"{self.what}: more than the {self.size} bytes announced; "
                                     "refused")
            self._hash.update(data)
            self.received += len(data)
            view[:len(data)] = data
            if time.monotonic() >= self._next_report:
                self._report()
            return len(data)

    def _report(self) -> None:
        """A line every few seconds on a long transfer (shown when a person watches)."""
        self._next_report = time.monotonic() + PROGRESS_SECONDS
        if self.received and self.size > 0:
            log.info("%s: %.0f%% of %.1f MiB", self.what, 100 * self.received / self.size,
                     self.size / 2**20)

    def _finish(self) -> None:
        if self._verified:
            return
        got = f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if got != self.digest:
            raise DigestMismatch(f"{self.what}: content hashes to {got}; refused")
        self._verified = True

    @property
    def verified(self) -> bool:
        return self._verified

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        super().close()


def _read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    chunks, total = [], 0
    try:
        for chunk in resp.iter_content(CHUNK):
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what}: larger than {limit} bytes; refused")
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise RegistryError(f"{what}: transfer failed: {_short(exc)}") from None
    finally:
        resp.close()
    return b"".join(chunks)


def _media_type(resp: requests.Response, body: bytes, what: str) -> str:
    header = resp.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(f"{what}: the registry sent something that is not JSON") from None
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if declared and header and header in MANIFESTS + SCHEMA1 and declared != header:
        raise RegistryError(f"{what}: Content-Type {header} disagrees with mediaType {declared}")
    found = declared or header
    if found in MANIFESTS + SCHEMA1:
        return found
    if isinstance(doc, dict):
        if doc.get("schemaVersion") == 1:
            return SCHEMA1[0]
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc and "layers" in doc:
            return OCI_MANIFEST
    return found or "unknown"


def _json(body: bytes, what: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(f"{what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what}: not a JSON object")
    return doc


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if len(text) > 200:
        text = text[:200] + "…"
    return text
