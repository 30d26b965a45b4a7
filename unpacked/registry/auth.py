"""Registry authentication, attached once to the session: challenges, tokens, credential files.

A ``RegistryAuth`` answers ``401`` challenges (Bearer token or Basic) and re-sends the request;
tokens are cached per realm/service/scope/identity in diskcache (owner-only files) until about
80 % of their life, and attached up front on later requests so most requests need no round trip.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import diskcache
import requests
from requests.auth import AuthBase

from ..errors import Unauthorized

log = logging.getLogger(__name__)

HUB_KEYS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*({_TOKEN})(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*,?')
_REPO_PATH = re.compile(r"^/v2/(.+?)/(manifests|blobs|tags)/")


def parse_challenge(header: str) -> list[tuple[str, dict[str, str]]]:
    """Parse a ``WWW-Authenticate`` value into ``[(scheme, params)]`` (RFC 7235).

    Quoted values may hold commas and escaped quotes: ``scope="repository:a/b:pull,push"``.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    for m in _PARAM.finditer(header):
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


def find_credential(host: str, environ: Mapping[str, str] | None = None) -> Credential | None:
    """The first ``auths`` entry matching ``host`` (Docker Hub's aliases match each other)."""
    environ = os.environ if environ is None else environ
    wanted = {host.lower()} | (HUB_KEYS if host.lower() in HUB_KEYS else set())
    for path in config_files(environ):
        try:
            auths = json.loads(path.read_text()).get("auths", {})
        except (OSError, ValueError, AttributeError):
            continue
        for key, entry in auths.items():
            if _host_of(key) not in wanted or not isinstance(entry, dict):
                continue
            if entry.get("username") and entry.get("password"):
                return Credential(entry["username"], entry["password"])
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    log.warning("%s: unreadable auth entry for %s, ignored", path, key)
                    continue
                return Credential(user, password)
    return None


class TokenStore:
    """Bearer tokens by realm/service/scope/identity: in memory, and on disk for the next run."""

    def __init__(self, directory: Path | None):
        self._memory: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._disk = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
            old = os.umask(0o077)
            try:
                self._disk = diskcache.Cache(str(directory))
            finally:
                os.umask(old)

    @staticmethod
    def key(realm: str, service: str, scope: str, identity: str) -> str:
        return "\x1f".join((realm, service, scope, identity))

    def get(self, key: str) -> str | None:
        with self._lock:
            hit = self._memory.get(key)
        if hit and hit[1] > time.time():
            return hit[0]
        if self._disk is not None:
            got = self._disk.get(key)
            if got:
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
            self._disk.set(key, (token, until), expire=max(1.0, lifetime * 0.8))

    def drop(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)
        if self._disk is not None:
            self._disk.delete(key)


class RegistryAuth(AuthBase):
    """Answers 401 challenges for every request of a session, and pre-authorises repeats."""

    def __init__(self, session: requests.Session, tokens: TokenStore,
                 credentials=find_credential, timeout: float | tuple = 60):
        self.session = session
        self.tokens = tokens
        self.credentials = credentials
        self.timeout = timeout
        self._known: dict[str, tuple[str, dict[str, str]]] = {}   # host -> challenge last seen
        self._creds: dict[str, Credential | None] = {}
        self._lock = threading.Lock()

    def credential(self, host: str) -> Credential | None:
        with self._lock:
            if host not in self._creds:
                self._creds[host] = self.credentials(host)
            return self._creds[host]

    def set_credential(self, host: str, credential: Credential | None) -> None:
        with self._lock:
            self._creds[host] = credential

    @staticmethod
    def scope_for(url: str, method: str) -> str | None:
        m = _REPO_PATH.match(urlsplit(url).path)
        if not m:
            return None
        push = method in ("POST", "PUT", "PATCH", "DELETE")
        return f"repository:{m.group(1)}:{'pull,push' if push else 'pull'}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if "Authorization" not in request.headers:
            header = self.known_header(request.url, request.method)
            if header:
                request.headers["Authorization"] = header
        request.register_hook("response", self._on_response)
        return request

    def known_header(self, url: str, method: str) -> str | None:
        """The Authorization a request to ``url`` needs, if a past challenge tells (no I/O but
        the token cache)."""
        host = urlsplit(url).netloc
        with self._lock:
            known = self._known.get(host)
        if not known:
            return None
        return self._header(host, known, self.scope_for(url, method), fetch=False)

    def _on_response(self, response: requests.Response, **kwargs) -> requests.Response:
        request = response.request
        if response.status_code != 401 or getattr(request, "_unpacked_retry", False):
            return response
        challenges = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        chosen = next((c for c in challenges if c[0] == "bearer"), None) or \
            next((c for c in challenges if c[0] == "basic"), None)
        if chosen is None:
            return response
        host = urlsplit(request.url).netloc
        with self._lock:
            self._known[host] = chosen
        scope = chosen[1].get("scope") or self.scope_for(request.url, request.method)
        rejected = "Authorization" in request.headers    # what we sent was refused: refetch
        if rejected or chosen[1].get("error") in ("invalid_token", "insufficient_scope"):
            self.tokens.drop(self._token_key(host, chosen, scope))
        header = self._header(host, chosen, scope, fetch=True, force=rejected)
        if header is None:
            return response
        response.content  # noqa: B018 - drain so the connection returns to the pool
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
                force: bool = False) -> str | None:
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
            token = self._fetch_token(host, params, scope, cred, key)
        return f"Bearer {token}" if token else None

    def _fetch_token(self, host: str, params: dict[str, str], scope: str | None,
                     cred: Credential | None, key: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise Unauthorized(f"{host}: Bearer challenge without a realm")
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in (scope or "").split() if s]
        auth = (cred.username, cred.password) if cred else None
        who = f"as {cred.identity}" if cred else "anonymously"
        try:
            resp = self.session.get(realm, params=query, auth=auth, timeout=self.timeout)
        except requests.RequestException as exc:
            raise Unauthorized(f"{host}: token server {realm} unreachable: {exc}") from None
        if resp.status_code != 200:
            raise Unauthorized(f"unauthorized for {host}: token server {realm} answered "
                               f"{resp.status_code} {_brief(resp)} ({who})",
                               status=resp.status_code, code="UNAUTHORIZED")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise Unauthorized(f"{host}: token server {realm} sent no token")
        self.tokens.put(key, token, lifetime)
        log.debug("token for %s scope %s %s, %ss", host, scope, who, lifetime)
        return token


def _brief(resp: requests.Response) -> str:
    text = resp.text.strip().replace("\n", " ")
    return text[:200]
