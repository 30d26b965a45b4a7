"""The registry client: one pooled session, verified typed documents, bounded streamed blobs.

Nothing is trusted before it is verified: manifest bytes against their digest, the config
against its descriptor, and every blob against its digest and size at the end of its stream.
Every request has a total deadline and every document a size cap; tag listings are capped in
pages and in tags; whatever a registry says is sanitised before it reaches a message.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from ..errors import (
    BadDocument,
    DigestMismatch,
    NotFound,
    RegistryError,
    Unauthorized,
    UnpackedError,
    Unreachable,
    Unsupported,
    sanitize,
)
from ..reference import ImageRef
from . import documents as docs
from . import platform as platforms
from .auth import Lookup, RegistryAuth, TokenStore, find_credential
from .heads import Headers, Heads
from .resolved import Layer, PlatformImage, Resolved
from .retry import (
    RetryAdapter,
    RetryPolicy,
    network_problem,
    retry_after,
    retryable_status,
)
from .rounds import HeadRound

log = logging.getLogger(__name__)

CHUNK = 256 << 10
PROGRESS_SECONDS = 10.0
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
MAX_TAG_PAGES = 1000
MAX_TAGS = 100_000
MIN_BLOB_RATE = 64 << 10        # bytes/s a blob transfer must average (after a grace period)
BLOB_GRACE = 300.0              # seconds every blob transfer may take whatever its size
_STREAM_ERRORS = (requests.RequestException, Urllib3Error, OSError)


def hasher(digest: str):
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise Unsupported(f"digest algorithm {sanitize(algorithm, 20)!r} is not supported")
    return hashlib.new(algorithm)


def verify(data: bytes, digest: str, what: str) -> None:
    h = hasher(digest)
    h.update(data)
    got = f"{digest.partition(':')[0]}:{h.hexdigest()}"
    if got != digest:
        raise DigestMismatch(f"{what}: content hashes to {got}, expected {digest}; refused")


def _error_text(resp: requests.Response, body: bytes) -> tuple[str | None, str]:
    """The registry's error code and message, from its JSON body when it sent one."""
    try:
        first = docs.decode(body, "error", 1 << 16).get("errors")[0]
        code, message = first.get("code"), first.get("message")
        return (sanitize(code, 40) if isinstance(code, str) else None,
                sanitize(message, 200) if isinstance(message, str) else "")
    except (BadDocument, AttributeError, IndexError, TypeError, KeyError):
        text = body.decode("utf-8", "replace") if resp.request.method != "HEAD" else ""
        return None, sanitize(text, 200)


@dataclass(frozen=True)
class Limits:
    """How long one interaction with a registry may take."""

    timeout: float = 60.0           # to connect, and between two reads
    deadline: float = 300.0         # a whole document request, however slowly it trickles

    def http_timeout(self) -> tuple[float, float]:
        return (min(self.timeout, 30.0), self.timeout)


class RegistryClient:
    """All requests to registries go through here: one session, auth and retries attached once."""

    def __init__(self, cache_dir: Path | None = None, policy: RetryPolicy | None = None,
                 timeout: float = 60.0, credentials: Lookup = find_credential, pool: int = 16,
                 deadline: float = 300.0):
        self.policy = policy or RetryPolicy()
        self.limits = Limits(timeout, deadline)
        self.timeout = self.limits.http_timeout()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "unpacked/0.2 (+cvmfs)"
        # requests re-reads proxies and ~/.netrc from the environment on every request (a
        # third of a HEAD's cost): only when a proxy is set; the CA bundle is read here once.
        self.session.trust_env = any(os.environ.get(v) or os.environ.get(v.lower())
                                     for v in PROXY_VARIABLES)
        if not self.session.trust_env:
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle:
                self.session.verify = bundle
        adapter = RetryAdapter(self.policy, deadline=deadline, pool_connections=pool,
                               pool_maxsize=pool)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        tokens = TokenStore(cache_dir / "tokens" if cache_dir else None)
        self.auth = RegistryAuth(self.session, tokens, credentials, self.timeout)
        self._heads: Heads | None = None
        if not self.session.trust_env:
            verify = self.session.verify
            ca = verify if isinstance(verify, str) else requests.certs.where()
            self._heads = Heads(ca, self.timeout, deadline, self.session.headers["User-Agent"],
                                idle=pool)

    def close(self) -> None:
        self.session.close()
        if self._heads is not None:
            self._heads.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _fast_head(self, url: str) -> tuple[int | None, str | None]:
        """A HEAD without requests' machinery (``Heads``, which says what it saves): the
        common case of a re-resolve. Returns (status, digest); anything unusual (401,
        errors) makes the caller take the full path, with its retries, auth answers and
        error messages."""
        if self._heads is None:
            return None, None
        answer = self._heads.head(url, self._lean_headers(url))
        if answer is None:
            return None, None
        status, got = answer
        if retryable_status(status):
            # the full path retries; wait as it would have, so Retry-After is honoured
            delay = retry_after(got.get("Retry-After"))
            delay = self.policy.backoff(1) if delay is None else delay
            if delay <= min(self.policy.seconds, 60.0):
                time.sleep(delay)
        return status, _digest_of(got)

    def _lean_headers(self, url: str) -> dict[str, str]:
        headers = {"Accept": docs.ACCEPT}
        auth = self.auth.known_header(url, "HEAD")
        if auth:
            headers["Authorization"] = auth
        return headers

    @property
    def lean(self) -> bool:
        """HEADs may take the lean path (not through a proxy: requests handles those)."""
        return self._heads is not None

    def head_round(self, bases: list[str], take: Callable[[str], tuple[object, ImageRef] | None],
                   done: Callable[[object, int | None, str | None], None],
                   more: Callable[[], bool], stop: threading.Event, per_host: int) -> None:
        """The HEADs of many tags on the lean path, from this thread (``rounds.HeadRound``):
        ``take(base)`` names the next tag to ask of the registry at ``base`` (an
        ``ImageRef.base_url``), or None; ``done(key, status, digest)`` hears each answer
        (status None: none to use): ``head_manifest(asked=status or 0)`` takes it further."""
        def request(base: str) -> tuple[object, str, dict[str, str]] | None:
            item = take(base)
            if item is None:
                return None
            key, ref = item
            self.auth.trust(ref.api_host)
            url = f"{ref.base_url}/v2/{ref.repository}/manifests/{ref.tag}"
            try:
                return key, url, self._lean_headers(url)
            except UnpackedError:       # credentials that cannot be read: the full path says
                return key, url, None   # so for this image alone

        def answered(key: object, answer: tuple[int, Headers] | None) -> None:
            if answer is None:
                done(key, None, None)
            else:
                done(key, answer[0], _digest_of(answer[1]))
        if self._heads is None:
            raise RuntimeError("no lean path: HEADs go through requests (a proxy is set)")
        HeadRound(self._heads, per_host).run(bases, request, answered, more, stop)

    def request(self, method: str, ref: ImageRef, path: str, what: str, *,  # noqa: PLR0913 - requests' keywords
                # requests' own keyword options, passed through as requests names them
                headers: dict | None = None, stream: bool = False, ok=(200,),
                url: str | None = None, **kwargs) -> requests.Response:
        """One request to ``/v2/<repository>/<path>``; a failure becomes a one-line error."""
        self.auth.trust(ref.api_host)
        url = url or f"{ref.base_url}/v2/{ref.repository}/{path}"
        try:
            resp = self.session.request(method, url, headers=headers, stream=stream,
                                        timeout=self.timeout, auth=self.auth, **kwargs)
        except Unauthorized:
            raise
        except (requests.RequestException, OSError) as exc:
            reason, _ = network_problem(exc, urlsplit(url).netloc or ref.api_host)
            raise Unreachable(f"{what}: {reason}") from None
        if resp.status_code in ok:
            return resp
        raise self.error(resp, ref, what)

    def error(self, resp: requests.Response, ref: ImageRef, what: str) -> RegistryError:
        try:
            body = resp.raw.read(1 << 16, decode_content=True) if resp.raw else b""
        except _STREAM_ERRORS:
            body = b""
        resp.close()
        code, message = _error_text(resp, body or b"")
        answer = f"{resp.status_code} {code or sanitize(resp.reason or '', 60)}".strip()
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
            wait = sanitize(resp.headers.get("Retry-After", ""), 60)
            return RegistryError(f"{what}: rate limited, registry answered {answer}"
                                 + (f" (Retry-After {wait})" if wait else ""), 429, code)
        return RegistryError(f"{what}: registry answered {answer}", resp.status_code, code)

    def read_document(self, resp: requests.Response, limit: int, what: str) -> bytes:
        """A whole response body, capped in size and in total time."""
        deadline = time.monotonic() + self.limits.deadline
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            resp.close()
            raise BadDocument(f"{what}: {int(declared):,} bytes announced, more than "
                              f"{limit:,}; refused")
        chunks, total = [], 0
        try:
            while True:
                # read1: whatever has arrived, so a trickle cannot outlast the deadline
                chunk = resp.raw.read1(min(CHUNK, limit + 1 - total), decode_content=True)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise BadDocument(f"{what}: larger than {limit:,} bytes; refused")
                if time.monotonic() > deadline:
                    raise RegistryError(f"{what}: not received within "
                                        f"{self.limits.deadline:g}s; refused")
                chunks.append(chunk)
        except _STREAM_ERRORS as exc:
            reason, _ = network_problem(exc, urlsplit(resp.url).netloc)
            raise RegistryError(f"{what}: transfer failed: {reason}") from None
        finally:
            resp.close()
        return b"".join(chunks)

    # -- manifests ----------------------------------------------------------------------------

    def head_manifest(self, ref: ImageRef, reference: str,
                      asked: int | None = None) -> str | None:
        """The digest a tag points at (one HEAD, not counted as a pull), or None if unsaid.
        ``asked``: the status a round's lean HEAD had (0: none usable, or not asked there);
        None: the lean path is tried first here."""
        what = f"manifest {ref.registry}/{ref.repository}:{reference}"
        self.auth.trust(ref.api_host)
        status, digest = (asked, None) if asked is not None else self._fast_head(
            f"{ref.base_url}/v2/{ref.repository}/manifests/{reference}")
        if status == 200 and digest:
            return digest
        if status == 404:
            self.get_manifest(ref, reference)      # the GET carries the registry's reason
            raise NotFound(f"{what}: registry answered 404", 404)
        try:
            resp = self.request("HEAD", ref, f"manifests/{reference}", what,
                                headers={"Accept": docs.ACCEPT})
        except RegistryError as exc:
            if exc.status in (401, 404):
                # HEAD has no body: ask again with GET so the user sees the registry's reason.
                self.get_manifest(ref, reference)
            raise
        resp.close()
        digest = resp.headers.get("Docker-Content-Digest")
        return digest if docs.is_digest(digest) else None

    def get_manifest(self, ref: ImageRef, reference: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of a manifest, verified against its digest."""
        by_digest = docs.is_digest(reference)
        what = f"manifest {ref.registry}/{ref.repository}{'@' if by_digest else ':'}{reference}"
        resp = self.request("GET", ref, f"manifests/{reference}", what,
                            headers={"Accept": docs.ACCEPT}, stream=True)
        content_type = resp.headers.get("Content-Type", "")
        said = resp.headers.get("Docker-Content-Digest")
        body = self.read_document(resp, docs.MAX_MANIFEST, what)
        digest = reference if by_digest else (said if docs.is_digest(said) else None)
        if digest is None:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
        verify(body, digest, what)
        if said and docs.is_digest(said) and said != digest and said.startswith("sha256:") \
                and digest.startswith("sha256:"):
            raise DigestMismatch(f"{what}: registry says {said}, content is {digest}")
        return body, docs.media_type_of(body, content_type, what), digest

    def resolve(self, ref: ImageRef, wanted: tuple[str, ...],  # noqa: PLR0913
                known: Resolved | None = None, top: str | None = None,
                headed: bool = False) -> Resolved:
        """Resolve a tag or digest to the image manifest of each platform asked for.

        With ``known`` (the last result for this input) an unchanged tag costs one HEAD;
        none when ``headed``: a HEAD was just made, and ``top`` is what it said the tag
        points at (None: it did not say; the manifest is then fetched by tag).
        """
        top = ref.digest or top or (None if headed else self.head_manifest(ref, ref.tag))
        if known is not None and top is not None and known.top_digest == top \
                and known.wanted == wanted:
            return known
        body, media_type, digest = self.get_manifest(ref, top or ref.tag)
        top = top or digest
        what = f"{ref}"
        if media_type in docs.INDEXES:
            index = docs.parse_index(body, media_type, f"index {digest} of {ref}")
            entries, missing = platforms.select(index, wanted)
            if not entries:
                offers = ", ".join(platforms.offered(index)) or "none"
                raise NotFound(f"{what}: no image for {', '.join(wanted)} in index {digest} "
                               f"(offers: {offers})")
            images = self._platform_images(ref, entries)
            offered = platforms.offered(index)
        else:
            image = self._platform_image(ref, body, media_type, digest)
            images, missing = self._single(image, wanted)
            if not images:
                raise NotFound(f"{what}: a single-platform image for {image.platform}, not "
                               f"{', '.join(wanted)}")
            offered = [image.platform]
        return Resolved(ref.name, top, media_type, tuple(wanted), images, tuple(missing),
                        time.time(), tuple(offered))

    def _platform_images(self, ref: ImageRef,
                         entries: list[docs.Descriptor]) -> list[PlatformImage]:
        """The images of the chosen index entries: each must be the platform its entry
        says, and one platform counts once (a lying index fails the image, not the run)."""
        images: list[PlatformImage] = []
        for entry in entries:
            image = self._platform_image(ref, *self._child(ref, entry))
            said = entry.platform
            got = docs.Platform.parse(image.platform)
            if not platforms.matches(got, said) and not platforms.matches(said, got):
                raise BadDocument(f"{ref}: index entry {entry.digest} is for {said}, but its "
                                  f"config says {got}")
            if any(i.platform == image.platform for i in images):
                continue
            images.append(image)
        return images

    def _child(self, ref: ImageRef, entry: docs.Descriptor) -> tuple[bytes, str, str]:
        body, media_type, digest = self.get_manifest(ref, entry.digest)
        if media_type in docs.INDEXES:
            raise Unsupported(f"{ref}: index entry {entry.digest} is itself an index")
        return body, media_type, digest

    @staticmethod
    def _single(image: PlatformImage, wanted: tuple[str, ...]):
        """A single-manifest image counts as the platform its config names."""
        if platforms.ALL in wanted:
            return [image], []
        offered = docs.Platform.parse(image.platform)
        if any(platforms.matches(docs.Platform.parse(w), offered) for w in wanted):
            return [image], [w for w in wanted
                             if not platforms.matches(docs.Platform.parse(w), offered)]
        return [], list(wanted)

    def _platform_image(self, ref: ImageRef, body: bytes, media_type: str,
                        digest: str) -> PlatformImage:
        what = f"manifest {digest} of {ref}"
        if media_type in docs.SCHEMA1:
            raise Unsupported(f"{ref}: Docker schema 1 manifest {digest} is not supported; "
                              "re-push the image with a current client")
        if media_type not in docs.MANIFESTS:
            raise Unsupported(f"{ref}: manifest {digest} has media type {media_type!r}, "
                              "not an image manifest")
        manifest = docs.parse_manifest(body, media_type, what)
        if manifest.config.media_type not in docs.CONFIG_TYPES:
            raise Unsupported(f"{ref}: manifest {digest} is not a container image (config "
                              f"type {manifest.config.media_type!r})")
        config = self.get_config(ref, manifest.config)
        parsed = docs.parse_config(config, f"config {manifest.config.digest} of {ref}")
        if len(parsed.diff_ids) != len(manifest.layers):
            raise BadDocument(f"{ref}: config {manifest.config.digest} lists "
                              f"{len(parsed.diff_ids)} diff_ids for {len(manifest.layers)} "
                              "layers")
        layers = [Layer(d.digest, d.size, d.media_type, diff, d.urls)
                  for d, diff in zip(manifest.layers, parsed.diff_ids, strict=True)]
        for layer in layers:
            hasher(layer.digest)
        log.debug("%s -> %s (%s)", ref, digest, parsed.platform)
        return PlatformImage(parsed.platform, digest, media_type, body, manifest.config.digest,
                             config, layers)

    def get_config(self, ref: ImageRef, descriptor: docs.Descriptor) -> bytes:
        what = f"config {descriptor.digest} of {ref}"
        if descriptor.size > docs.MAX_CONFIG:
            raise BadDocument(f"{what}: {descriptor.size:,} bytes, more than "
                              f"{docs.MAX_CONFIG:,}; refused")
        resp = self.request("GET", ref, f"blobs/{descriptor.digest}", what, stream=True)
        body = self.read_document(resp, docs.MAX_CONFIG, what)
        verify(body, descriptor.digest, what)
        return body

    # -- blobs and tags -----------------------------------------------------------------------

    def open_blob(self, ref: ImageRef, digest: str, size: int,
                  url: str | None = None) -> BlobStream:
        """A verifying, resuming stream of one blob (``url``: a foreign layer's own address)."""
        return BlobStream(self, ref, digest, size, url)

    def tags(self, ref: ImageRef, page: int = 1000) -> tuple[list[str], list[str]]:
        """Every valid tag of a repository (following ``Link`` pagination on the same
        registry, capped in pages and tags), and some of the names the tag grammar refused."""
        what = f"tag list of {ref.registry}/{ref.repository}"
        url = f"{ref.base_url}/v2/{ref.repository}/tags/list?n={page}"
        origin = urlsplit(url)[:2]
        tags: list[str] = []
        bad: list[str] = []
        seen = 0
        seen_urls: set[str] = set()
        while url and url not in seen_urls:
            if len(seen_urls) >= MAX_TAG_PAGES:
                raise RegistryError(f"{what}: more than {MAX_TAG_PAGES} pages; refused")
            seen_urls.add(url)
            resp = self.request("GET", ref, "", what, url=url, stream=True)
            link = resp.links.get("next", {}).get("url")
            good, wrong, count = docs.parse_tag_list(
                self.read_document(resp, docs.MAX_TAG_PAGE, what), what)
            tags.extend(good)
            bad.extend(wrong[:max(0, 20 - len(bad))])
            seen += count
            if seen > MAX_TAGS:
                raise RegistryError(f"{what}: more than {MAX_TAGS:,} tags; refused")
            url = urljoin(url, link) if link else None
            if url and urlsplit(url)[:2] != origin:
                raise RegistryError(f"{what}: the next page is on another host "
                                    f"({sanitize(url, 100)}); refused")
        return tags, bad

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
        if urlsplit(url).scheme not in ("http", "https"):
            raise RegistryError(f"{what}: upload location {sanitize(location, 100)!r} refused")
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
    stream reached its end without error (``read`` returning ``b''``). The declared size bounds
    the transfer, and the transfer must average a minimal rate after a grace period.
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
        self._started = time.monotonic()
        self._deadline = self._started + BLOB_GRACE + max(size, 0) / MIN_BLOB_RATE
        self._next_report = self._started + PROGRESS_SECONDS
        self._open()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.received}-"} if self.received else {}
        if self.url:
            try:
                resp = self.client.session.get(self.url, headers=headers, stream=True,
                                               timeout=self.client.timeout)
            except (requests.RequestException, OSError) as exc:
                reason, _ = network_problem(exc, urlsplit(self.url).netloc)
                raise Unreachable(f"{self.what}: {reason}") from None
            if resp.status_code not in (200, 206):
                resp.close()
                raise RegistryError(f"{self.what}: {sanitize(self.url, 120)} answered "
                                    f"{resp.status_code}")
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
                                        f"({sanitize(resp.headers.get('Content-Range'), 60)})")
            else:
                self._skip = self.received       # 200: the whole blob again; skip what we have
            log.info("%s: resuming at byte %d", self.what, self.received)
        self._resp = resp

    def _retry(self, exc: BaseException) -> None:
        self._failures += 1
        if self._resp is not None:
            self._resp.close()
        reason, again = network_problem(exc, self.ref.api_host) \
            if not isinstance(exc, EOFError) else (str(exc), True)
        if not again or self._failures >= self.client.policy.attempts:
            raise RegistryError(f"{self.what}: transfer failed {self._failures} times, last: "
                                f"{reason}") from None
        log.warning("%s: transfer broke after %d bytes (%s), resuming", self.what,
                    self.received, reason)
        time.sleep(self.client.policy.backoff(self._failures))
        self._open()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        while True:
            if time.monotonic() > self._deadline:
                raise RegistryError(f"{self.what}: slower than {MIN_BLOB_RATE >> 10} KiB/s "
                                    f"({self.received:,} of {self.size:,} bytes in "
                                    f"{time.monotonic() - self._started:.0f}s); refused")
            try:        # read1: whatever has arrived, so the deadline is checked often
                data = self._resp.raw.read1(min(len(view), CHUNK), decode_content=False)
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
                if self._skip or self.received < self.size:
                    self._retry(EOFError(f"connection closed at byte {self.received}"))
                    continue
                self._finish()
                return 0
            if self.received + len(data) > self.size:
                raise DigestMismatch(f"{self.what}: more than the {self.size:,} bytes "
                                     "announced; refused")
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


def _digest_of(headers: Headers) -> str | None:
    """The digest an answer names, when it is one."""
    digest = headers.get("Docker-Content-Digest")
    return digest if docs.is_digest(digest) else None
