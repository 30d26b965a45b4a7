"""A real ``docker-registry`` (CNCF distribution) on loopback, in three auth modes.

``none``: open; ``basic``: htpasswd; ``token``: ``auth: token`` with a small issuer that
signs real ES256 JWTs, as Docker Hub, GitLab and Harbor do.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import bcrypt
import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

USER, PASSWORD = "tester", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libtrust_kid(public_key) -> str:
    """The key id distribution 2.x expects in a JWT header (libtrust's format)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenIssuer:
    """Issues registry tokens: full access with the right Basic credentials, none otherwise."""

    def __init__(self, folder: Path, service: str = "test-registry"):
        self.service, self.issuer = service, "test-issuer"
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .sign(self.key, hashes.SHA256()))
        self.cert_path = folder / "issuer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.kid = libtrust_kid(self.key.public_key())
        self.requests: list[dict] = []
        self.expires_in = 300
        self.field = "token"
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                query = parse_qs(urlsplit(self.path).query)
                header = self.headers.get("Authorization", "")
                user = None
                if header.startswith("Basic "):
                    u, _, p = base64.b64decode(header[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        self.send_response(401)
                        body = b'{"details":"incorrect username or password"}'
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    user = u
                issuer.requests.append({"user": user, "scope": query.get("scope", [])})
                access = []
                for scope in query.get("scope", []):
                    kind, rest = scope.split(":", 1)
                    name, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": name,
                                   "actions": actions.split(",") if user else []})
                body = json.dumps({issuer.field: issuer.sign(user or "", access),
                                   "expires_in": issuer.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sign(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})

    def stop(self) -> None:
        self.server.shutdown()


class Registry:
    """One running registry; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, folder: Path, auth: str = "none",
                 notify: tuple[str, str] | None = None):
        """``notify``: (url, Authorization header) of a notification endpoint."""
        folder.mkdir(parents=True, exist_ok=True)
        self.auth, self.port = auth, free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.issuer = None
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(folder / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if auth == "basic":
            htpasswd = folder / "htpasswd"
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
            htpasswd.write_text(f"{USER}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "test-realm", "path": str(htpasswd)}}
        elif auth == "token":
            self.issuer = TokenIssuer(folder)
            config["auth"] = {"token": {"realm": self.issuer.url, "service": self.issuer.service,
                                        "issuer": self.issuer.issuer,
                                        "rootcertbundle": str(self.issuer.cert_path)}}
        if notify:
            config["notifications"] = {"endpoints": [{
                "name": "listener", "url": notify[0], "headers": {"Authorization": [notify[1]]},
                "timeout": "2s", "threshold": 3, "backoff": "1s"}]}
        (folder / "config.yml").write_text(json.dumps(config))
        self.log = open(folder / "registry.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(["docker-registry", "serve", str(folder / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry did not start: {folder / 'registry.log'}")
            time.sleep(0.05)

    @property
    def creds(self) -> str | None:
        return f"{USER}:{PASSWORD}" if self.auth != "none" else None

    def session(self) -> requests.Session:
        """A plain requests session that can write to this registry (test setup only)."""
        s = requests.Session()
        if self.auth == "basic":
            s.auth = (USER, PASSWORD)
        return s

    def token_for(self, repo: str) -> dict:
        if self.issuer is None:
            return {}
        access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
        return {"Authorization": "Bearer " + self.issuer.sign(USER, access)}

    def _accept(self, repo: str) -> dict:
        accept = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.oci.image.index.v1+json")
        return {"Accept": accept, **self.token_for(repo)}

    def retag(self, repo: str, source_tag: str, tags: list[str]) -> None:
        """Point more tags at one manifest (a registry stores many tags for few manifests)."""
        s = self.session()
        r = s.get(f"http://{self.host}/v2/{repo}/manifests/{source_tag}",
                  headers=self._accept(repo))
        r.raise_for_status()
        put_headers = {"Content-Type": r.headers["Content-Type"], **self.token_for(repo)}
        for tag in tags:
            s.put(f"http://{self.host}/v2/{repo}/manifests/{tag}", data=r.content,
                  headers=put_headers).raise_for_status()

    def delete_tag(self, repo: str, tag: str) -> None:
        """Remove a tag upstream (deleting its manifest), as a registry admin would."""
        s = self.session()
        r = s.head(f"http://{self.host}/v2/{repo}/manifests/{tag}", headers=self._accept(repo))
        r.raise_for_status()
        digest = r.headers["Docker-Content-Digest"]
        s.delete(f"http://{self.host}/v2/{repo}/manifests/{digest}",
                 headers=self.token_for(repo)).raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        if self.issuer:
            self.issuer.stop()
