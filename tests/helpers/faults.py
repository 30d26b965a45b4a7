"""A small fault-injecting HTTP proxy in front of the real registry, counting every request.

Faults are queued per path pattern and used up in order: ``reset`` (connection dropped after
N bytes of the body), ``status`` (an error answer, optionally with headers), ``flip`` (one
byte of the body changed), ``truncate`` (the body cut short with a matching Content-Length),
``body`` (a canned answer), ``slow`` (the body in chunks of ``at`` bytes, ``delay`` apart),
``redirect`` (307 to ``data`` + the path), ``ignore-range`` (a 200 for a Range request).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


@dataclass
class Fault:
    pattern: str
    kind: str
    times: int = 1
    status: int = 500
    headers: dict = field(default_factory=dict)
    at: int = 0
    method: str = "GET"
    data: bytes = b""
    delay: float = 0.0


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.received: list[tuple[str, str, dict, int]] = []    # with headers and body size
        self.paginate = False
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()      # headers and body go out in two writes: no Nagle wait
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                try:
                    proxy.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True     # the client went away: its business

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, pattern: str, kind: str, **kw) -> Fault:
        fault = Fault(pattern, kind, **kw)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.paginate = False
        with self.lock:
            self.faults.clear()
            self.log.clear()
            self.received.clear()

    def count(self, method: str, pattern: str = "") -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.log if m == method and re.search(pattern, p))

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.pattern, path):
                    fault.times -= 1
                    return fault
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._take(h.command, h.path)
        if fault and fault.kind in ("status", "body", "redirect"):
            self._canned(h, fault)
            return
        status, out_headers, data = self._forward(h, body, fault)
        h.send_response(status)
        for k, v in out_headers:
            h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            self._send(h, data, fault)

    def _canned(self, h: BaseHTTPRequestHandler, fault: Fault) -> None:
        """An answer made up here: an error status, a canned body, or a redirect."""
        status = 307 if fault.kind == "redirect" else fault.status
        with self.lock:
            self.log.append((h.command, h.path, status))
        if fault.kind == "redirect":
            data, headers = b"", {"Location": fault.data.decode() + h.path}
        else:
            data = fault.data or b'{"errors":[{"code":"INJECTED","message":"injected fault"}]}'
            headers = fault.headers
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes | None, fault: Fault | None):
        """The real registry's answer, changed as the fault says: (status, headers, body)."""
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
        if fault and fault.kind == "ignore-range":
            headers.pop("Range", None)
        headers["Host"] = self.upstream
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        with self.lock:
            self.log.append((h.command, h.path, resp.status))
            self.received.append((h.command, h.path, dict(h.headers), len(data)))
        keep_length = h.command == "HEAD"
        out = [(k, v.replace(self.upstream, self.host) if k.lower() == "location" else v)
               for k, v in resp.getheaders()
               if k.lower() not in HOP and (keep_length or k.lower() != "content-length")]
        if self.paginate and "/tags/list" in h.path and resp.status == 200:
            data, link = self._page(h.path, data)
            out = [(k, v) for k, v in out if k.lower() != "link"] + ([("Link", link)] if link
                                                                     else [])
        if fault and fault.kind == "flip" and data:
            at = min(fault.at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        if fault and fault.kind == "truncate":
            data = data[:fault.at]
        return resp.status, out, data

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, data: bytes, fault: Fault | None) -> None:
        if fault and fault.kind == "slow":
            for i in range(0, len(data), fault.at or 65536):
                h.wfile.write(data[i:i + (fault.at or 65536)])
                h.wfile.flush()
                time.sleep(fault.delay)
        elif fault and fault.kind == "reset":
            h.wfile.write(data[:fault.at])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
        else:
            h.wfile.write(data)

    @staticmethod
    def _page(path: str, data: bytes) -> tuple[bytes, str | None]:
        """Paginate a full tag list as the spec says (``n``, ``last``, a relative ``Link``)."""
        split = urlsplit(path)
        query = parse_qs(split.query)
        doc = json.loads(data)
        tags = sorted(doc.get("tags") or [])
        last = query.get("last", [""])[0]
        n = int(query.get("n", ["0"])[0] or 0) or len(tags)
        rest = [t for t in tags if t > last]
        page, more = rest[:n], rest[n:]
        link = f'<{split.path}?n={n}&last={page[-1]}>; rel="next"' if more else None
        return json.dumps({"name": doc.get("name"), "tags": page}).encode(), link

    def stop(self) -> None:
        self.server.shutdown()
