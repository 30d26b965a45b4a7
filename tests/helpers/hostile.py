"""A registry that says whatever a test makes it say, next to the real ``docker-registry``.

Routes map (method, path regex) to an answer: a status, headers and a body, or a function
that writes the answer itself (to dribble, never end, or hang). Every request is recorded
with its headers, so a test can check who received credentials.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps(doc) -> bytes:
    return json.dumps(doc).encode()


@dataclass
class Answer:
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    write: Callable | None = None          # write(handler): the whole answer, by hand


def self_signed(folder, name: str = "127.0.0.1") -> tuple[str, str]:
    """(certificate, key) files of a self-signed certificate for the IP address ``name``."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that dropped its connection (a reset) is no error of the test server."""
        if not isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            super().handle_error(request, client_address)


class HostileRegistry:
    """``tls``: (certificate, key) files: it speaks HTTPS."""

    def __init__(self, tls: tuple[str, str] | None = None):
        self.routes: list[tuple[str, re.Pattern, Answer]] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()      # headers and body go out in two writes: no Nagle wait
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                registry.handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.server = _Server(("127.0.0.1", 0), Handler)
        if tls:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, method: str, pattern: str, answer: Answer) -> None:
        """Answer requests matching (later routes win)."""
        with self.lock:
            self.routes.insert(0, (method, re.compile(pattern), answer))

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        with self.lock:
            self.requests.append((h.command, h.path, dict(h.headers)))
            found = next((a for m, p, a in self.routes
                          if m in (h.command, "*") and p.search(h.path)), None)
        answer = found or Answer(404, body=b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}')
        if answer.write:
            try:
                answer.write(h)
            except (BrokenPipeError, ConnectionResetError):
                h.close_connection = True
            return
        h.send_response(answer.status)
        for k, v in answer.headers.items():
            h.send_header(k, v)
        if "Content-Length" not in answer.headers:
            h.send_header("Content-Length", str(len(answer.body)))
        h.end_headers()
        if h.command != "HEAD" and "Content-Length" not in answer.headers:
            try:
                h.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):
                h.close_connection = True

    def image(self, repo: str, tag: str, manifest: dict | bytes, config: dict | bytes | None,
              blobs: dict[str, bytes] | None = None) -> str:
        """Serve a manifest (and its config and blobs) as they are given, however wrong;
        returns the manifest's digest."""
        body = manifest if isinstance(manifest, bytes) else dumps(manifest)
        digest = sha(body)
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}
        for ref in (tag, digest):
            self.on("*", f"^/v2/{repo}/manifests/{re.escape(ref)}$",
                    Answer(200, headers, body))
        if config is not None:
            data = config if isinstance(config, bytes) else dumps(config)
            self.on("GET", f"^/v2/{repo}/blobs/{sha(data)}$", Answer(200, {}, data))
        for blob_digest, data in (blobs or {}).items():
            self.on("GET", f"^/v2/{repo}/blobs/{blob_digest}$", Answer(200, {}, data))
        return digest

    def stop(self) -> None:
        self.server.shutdown()


def valid_image(layer: bytes, diff_id: str) -> tuple[dict, dict]:
    """A correct (manifest, config) pair for one uncompressed tar layer, to be spoilt."""
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    cfg = dumps(config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha(cfg), "size": len(cfg)},
                "layers": [{"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)}]}
    return manifest, config


def dribble(body: bytes, every: float) -> Callable:
    """An answer that sends one byte every ``every`` seconds."""
    def write(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", OCI_MANIFEST)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
            time.sleep(every)
    return write


def endless(size: int) -> Callable:
    """A blob answer that announces ``size`` bytes and never stops sending."""
    def write(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(size * 1000))
        h.end_headers()
        chunk = b"\0" * 65536
        for _ in range(100_000):
            h.wfile.write(chunk)
    return write


def hang(seconds: float) -> Callable:
    """An answer that never comes (within ``seconds``)."""
    def write(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        h.close_connection = True
    return write
