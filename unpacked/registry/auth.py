"""Registry authentication, attached once to the session: challenges, tokens, credential files.

A ``RegistryAuth`` answers ``401`` challenges (Bearer token or Basic) and re-sends the request;
tokens are cached per realm/service/scope/identity in diskcache (owner-only files) until about
80 % of their life, and attached up front on later requests so most requests need no round trip.

Credentials go only to hosts the client was asked to talk to (``trust``), and to the token
realm their own challenge names: never to a host a redirect or an upload location points at.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from ..errors import BadDocument, Unauthorized, UnpackedError, sanitize
from .documents import MAX_TOKEN, parse_token
from .heads import TOKEN
from .retry import network_problem

log = logging.getLogger(__name__)

HUB_KEYS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_PARAM = re.compile(rf'\s*({TOKEN})(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*,?')
_REPO_PATH = re.compile(r"^/v2/(.+?)/(manifests|blobs|tags)/")
MAX_CHALLENGE = 4096


class CredentialsError(UnpackedError):
    """A credentials file exists but cannot be read: say so rather than pull anonymously."""


def parse_challenge(header: str) -> list[tuple[str, dict[str, str]]]:
    """Parse a ``WWW-Authenticate`` value into ``[(scheme, params)]`` (RFC 7235).

    Quoted values may hold commas and escaped quotes: ``scope="repository:a/b:pull,push"``.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    for m in _PARAM.finditer(header[:MAX_CHALLENGE]):
        name, value = m.group(1), m.group(2)
        if value is None:
            challenges.append((name.lower(), {}))
        elif challenges:
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            challenges[-1][1][name.lower()] = value
    return challenges


@dataclass(frozen=True)
class Credential:
    username: str
    password: str

    @property
    def identity(self) -> str:
        """What names this credential in cache keys and logs: never the password."""
        return self.username

    def __repr__(self) -> str:
        return f"Credential({self.username!r}, ***)"


Lookup = Callable[[str], Credential | None]


def _host_of(key: str) -> str:
    key = key.strip()
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def config_files(environ: Mapping[str, str]) -> list[Path]:
    """Docker/Podman credential files, in the order they are consulted."""
    files = []
    if environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(environ["REGISTRY_AUTH_FILE"]))
    if environ.get("DOCKER_CONFIG"):
        files.append(Path(environ["DOCKER_CONFIG"]) / "config.json")
    home = environ.get("HOME") or os.path.expanduser("~")
    files.append(Path(home) / ".docker" / "config.json")
    return files


def _read_auths(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"credentials file {path}: cannot read it: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise CredentialsError(f"credentials file {path}: not valid JSON") from None
    auths = doc.get("auths", {}) if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise CredentialsError(f"credentials file {path}: 'auths' must be an object")
    return auths


def _entry_credential(path: Path, key: str, entry: object) -> Credential | None:
    if not isinstance(entry, dict):
        raise CredentialsError(f"credentials file {path}: entry {key!r} must be an object")
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and user and password:
        return Credential(user, password)
    encoded = entry.get("auth")
    if not encoded:
        return None       # e.g. a credential helper entry: not ours to use
    try:
        user, sep, password = base64.b64decode(str(encoded), validate=True).decode().partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CredentialsError(f"credentials file {path}: entry {key!r}: 'auth' is not "
                               "base64 of user:password") from None
    if not sep:
        raise CredentialsError(f"credentials file {path}: entry {key!r}: 'auth' holds no ':'")
    return Credential(user, password)


def find_credential(host: str, environ: Mapping[str, str] | None = None) -> Credential | None:
    """The first ``auths`` entry matching ``host`` (Docker Hub's aliases match each other)."""
    environ = os.environ if environ is None else environ
    wanted = {host.lower()} | (HUB_KEYS if host.lower() in HUB_KEYS else set())
    for path in config_files(environ):
        for key, entry in _read_auths(path).items():
            if isinstance(key, str) and _host_of(key) in wanted:
                found = _entry_credential(path, key, entry)
                if found is not None:
                    return found
    return None


def only_for(host: str, credential: Credential) -> Lookup:
    """A lookup that gives ``credential`` to ``host`` and nothing to anyone else."""
    def lookup(asked: str) -> Credential | None:
        return credential if asked == host else find_credential(asked)
    return lookup


class TokenStore:
    """Bearer tokens by realm/service/scope/identity: in memory, and on disk for the next run."""

    def __init__(self, directory: Path | None):
        self._memory: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._disk = None
        if directory is not None:
            self._disk = _open_token_cache(directory)

    @staticmethod
    def key(realm: str, service: str, scope: str, identity: str) -> str:
        return "\x1f".join((realm, service, scope, identity))

    def get(self, key: str) -> str | None:
        with self._lock:
            hit = self._memory.get(key)
        if hit and hit[1] > time.time():
            return hit[0]
        if self._disk is not None:
            got = _safe(lambda: self._disk.get(key))
            if isinstance(got, tuple | list) and len(got) == 2:
                token, until = got
                if until > time.time():
                    with self._lock:
                        self._memory[key] = (token, until)
                    return token
        return None

    def put(self, key: str, token: str, lifetime: float) -> None:
        until = time.time() + max(1.0, lifetime * 0.8)
        with self._lock:
            self._memory[key] = (token, until)
        if self._disk is not None:
            _safe(lambda: self._disk.set(key, (token, until), expire=max(1.0, lifetime * 0.8)))

    def drop(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)
        if self._disk is not None:
            _safe(lambda: self._disk.delete(key))


def _open_token_cache(directory: Path):
    """The on-disk token cache (owner-only); unusable means in-memory only, with a warning."""
    import diskcache
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        old = os.umask(0o077)
        try:
            return diskcache.Cache(str(directory))
        finally:
            os.umask(old)
    except Exception as exc:         # noqa: BLE001 - any failure: tokens stay in memory
        log.warning("token cache %s unusable (%s); tokens are kept in memory only", directory,
                    sanitize(getattr(exc, "strerror", None) or exc, 120))
        return None


def _safe(call):
    try:
        return call()
    except Exception:               # noqa: BLE001 - a cache that fails is a cache miss
        return None


class RegistryAuth(AuthBase):
    """Answers 401 challenges for the registries it trusts, and pre-authorises repeats."""

    def __init__(self, session: requests.Session, tokens: TokenStore,
                 credentials: Lookup = find_credential, timeout: float | tuple = 60):
        self.session = session
        self.tokens = tokens
        self.credentials = credentials
        self.timeout = timeout
        self._trusted: set[str] = set()
        self._known: dict[str, tuple[str, dict[str, str]]] = {}   # host -> challenge last seen
        self._creds: dict[str, Credential | None] = {}
        self._lock = threading.Lock()

    def trust(self, host: str) -> None:
        """``host`` is a registry we were asked to talk to: it may receive credentials."""
        with self._lock:
            self._trusted.add(host)

    def trusted(self, host: str) -> bool:
        with self._lock:
            return host in self._trusted

    def credential(self, host: str) -> Credential | None:
        with self._lock:
            if host in self._creds:
                return self._creds[host]
        found = self.credentials(host)
        with self._lock:
            self._creds[host] = found
        return found

    @staticmethod
    def scope_for(url: str, method: str) -> str | None:
        m = _REPO_PATH.match(urlsplit(url).path)
        if not m:
            return None
        push = method in ("POST", "PUT", "PATCH", "DELETE")
        return f"repository:{m.group(1)}:{'pull,push' if push else 'pull'}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if not self.trusted(urlsplit(request.url).netloc):
            return request
        if "Authorization" not in request.headers:
            header = self.known_header(request.url, request.method)
            if header:
                request.headers["Authorization"] = header
        origin = urlsplit(request.url)[:2]
        request.register_hook("response", lambda r, **kw: self._on_response(r, origin, **kw))
        return request

    def known_header(self, url: str, method: str) -> str | None:
        """The Authorization a request to ``url`` needs, if a past challenge tells (no I/O but
        the token cache)."""
        if not self._known:         # no challenge yet (an open registry): nothing to look up
            return None
        host = urlsplit(url).netloc
        if not self.trusted(host):
            return None
        with self._lock:
            known = self._known.get(host)
        if not known:
            return None
        return self._header(host, known, self.scope_for(url, method), fetch=False)

    def _on_response(self, response: requests.Response, origin: tuple[str, str],
                     **kwargs) -> requests.Response:
        """Answer a 401 of the registry asked, never of a host a redirect led to (not even
        another registry we trust: it could hand us its private image under another name),
        and never over another scheme."""
        request = response.request
        host = urlsplit(request.url).netloc
        if response.status_code != 401 or getattr(request, "_unpacked_retry", False) \
                or urlsplit(request.url)[:2] != origin or not self.trusted(host):
            return response
        challenges = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        chosen = next((c for c in challenges if c[0] == "bearer"), None) or \
            next((c for c in challenges if c[0] == "basic"), None)
        if chosen is None:
            return response
        with self._lock:
            self._known[host] = chosen
        scope = chosen[1].get("scope") or self.scope_for(request.url, request.method)
        rejected = "Authorization" in request.headers    # what we sent was refused: refetch
        if rejected or chosen[1].get("error") in ("invalid_token", "insufficient_scope"):
            self.tokens.drop(self._token_key(host, chosen, scope))
        header = self._header(host, chosen, scope, fetch=True, force=rejected,
                              plain_http=request.url.startswith("http://"))
        if header is None:
            return response
        with contextlib.suppress(requests.RequestException, OSError):
            response.raw.read(65536, decode_content=False)    # a little, not a flood
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = header
        retry._unpacked_retry = True
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new

    def _token_key(self, host: str, challenge, scope: str | None) -> str:
        params = challenge[1]
        cred = self.credential(host)
        return TokenStore.key(params.get("realm", ""), params.get("service", ""), scope or "",
                              cred.identity if cred else "")

    def _header(self, host: str, challenge, scope: str | None, fetch: bool,
                force: bool = False, plain_http: bool = False) -> str | None:
        scheme, params = challenge
        cred = self.credential(host)
        if scheme == "basic":
            if cred is None:
                return None
            raw = f"{cred.username}:{cred.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        key = self._token_key(host, challenge, scope)
        token = None if force else self.tokens.get(key)
        if token is None and fetch:
            token = self._fetch_token(host, params, scope, cred, key, plain_http)
        return f"Bearer {token}" if token else None

    def _fetch_token(self, host: str, params: dict[str, str], scope: str | None,
                     cred: Credential | None, key: str, plain_http: bool) -> str:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc or \
                (parts.scheme == "http" and not plain_http and cred is not None):
            raise Unauthorized(f"{host}: Bearer challenge names the realm "
                               f"{sanitize(realm, 120)!r}, not an https URL; refused")
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in (scope or "").split() if s]
        auth = (cred.username, cred.password) if cred else None
        who = f"as {cred.identity}" if cred else "anonymously"
        what = f"token from {sanitize(realm, 120)}"
        try:
            resp = self.session.get(realm, params=query, auth=auth, timeout=self.timeout,
                                    stream=True, allow_redirects=False)
            body = resp.raw.read(MAX_TOKEN + 1, decode_content=True)
            resp.close()
        except (requests.RequestException, OSError) as exc:
            reason, _ = network_problem(exc, parts.netloc)
            raise Unauthorized(f"{host}: token server unreachable: {reason}") from None
        if resp.status_code != 200:
            said = sanitize(body[:200].decode("utf-8", "replace"), 200)
            raise Unauthorized(f"unauthorized for {host}: token server {sanitize(realm, 120)} "
                               f"answered {resp.status_code} {said} ({who})",
                               status=resp.status_code, code="UNAUTHORIZED")
        try:
            answer = parse_token(body, what)
        except BadDocument as exc:
            raise Unauthorized(str(exc)) from None
        self.tokens.put(key, answer.token, answer.lifetime)
        log.debug("token for %s scope %s %s, %ss", host, scope, who, answer.lifetime)
        return answer.token
