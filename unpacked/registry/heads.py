"""Manifest HEADs over plain ``http.client`` connections, kept open per registry.

A no-op run is one HEAD per image, and on two cores the client's own CPU per HEAD decides
how close the run comes to the registry's speed: a bare urllib3 pool spends 0.45 ms on one,
``http.client``'s request and response 0.20 ms, the request written and the answer's head read
here 0.05 ms (2,000 HEADs to the bench's registry, measured). ``http.client`` still makes the
connections (TLS verified against the same CA bundle, the same timeouts); the answer is read
strictly and bounded: an HTTP/1.x status line, at most ``MAX_HEAD`` bytes of headers, no folded
lines, nothing after them, every answer's headers bounded in time by a ``Deadline``. Only the
common answer is taken from here; anything else (an error, a redirect, a 401, a retryable
status, an answer read no further, a CA bundle that does not load) makes the caller ask again
on the full path, with its retries, auth answers and messages.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import ssl
import threading
from urllib.parse import urlsplit

from .retry import Deadline, using

MAX_HEAD = 64 * 1024                # bytes of an answer's status line and headers
MAX_HEADERS = 100                   # header lines of one answer (http.client's own cap)
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"      # RFC 9110's token: a header's name (auth.py's too)
_NAME = re.compile(TOKEN)
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")                   # in a path: never sent
_OURS = ("host", "content-length", "transfer-encoding", "connection")  # never a caller's
_READ = ("docker-content-digest", "connection", "retry-after")   # what the caller reads
_CONTROLS = r"\x00-\x08\x0a-\x1f\x7f"                      # never in a header value
_CONTROL = re.compile(f"[{_CONTROLS}]")
_LINE = f"{TOKEN}:[^{_CONTROLS}]*".encode()                  # an answer's header line
_HEADER_LINES = re.compile(_LINE + rb"(?:\r\n" + _LINE + rb")*")


class Headers(dict):
    """An answer's headers by lower-cased name."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


class Unusable(Exception):
    """An answer read no further: the caller takes the full path."""


def header_block(netloc: str, headers: dict[str, str]) -> bytes | None:
    """A HEAD request's lines after the first, down to the blank line that ends it; None when
    a part could split the request or is not plain ASCII (a token the registry handed out is
    not trusted to be a header value)."""
    if _UNSAFE.search(netloc):
        return None
    lines = [f"Host: {netloc}"]
    for name, value in headers.items():
        if not isinstance(value, str) or not _NAME.fullmatch(name) or _CONTROL.search(value) \
                or name.lower() in _OURS:
            return None
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    except UnicodeEncodeError:
        return None


def request_line(path: str) -> bytes | None:
    """``HEAD <path> HTTP/1.1``: an absolute path with neither a query, a fragment, nor a byte
    that could split the request."""
    if not path.startswith("/") or "?" in path or "#" in path or _UNSAFE.search(path):
        return None
    try:
        return b"HEAD " + path.encode("ascii") + b" HTTP/1.1\r\n"
    except UnicodeEncodeError:
        return None


def read_answer(sock) -> tuple[int, Headers, bool]:
    """(status, headers, the connection may be kept) of a HEAD's answer on ``sock``. Raises
    ``http.client.RemoteDisconnected`` when the registry closed before a byte (an idle
    connection it dropped), ``Unusable`` for anything not strictly an answer's head."""
    return parse_head(_receive_head(sock))


def _receive_head(sock) -> bytes:
    """The answer's status line and headers, without the blank line that ends them."""
    buf = bytearray()
    head = None
    while head is None:
        chunk = sock.recv(16384)
        if not chunk:
            if not buf:
                raise http.client.RemoteDisconnected("closed before an answer")
            raise Unusable("cut short")
        head = gather(buf, chunk)
    return head


def gather(buf: bytearray, chunk: bytes) -> bytes | None:
    """``chunk`` added to ``buf``; the whole head once its blank line came, with nothing after
    it (each piece searched once: a registry that sends a byte at a time costs no more)."""
    buf += chunk
    end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise Unusable("headers too long")
        return None
    if end + 4 != len(buf) or end > MAX_HEAD:
        raise Unusable("more than a HEAD's answer")     # a HEAD's answer has no body
    return bytes(buf[:end])


def parse_head(head: bytes) -> tuple[int, Headers, bool]:
    """Checked whole by one expression (a token, a colon, a value without control bytes, per
    line: folded lines fail), then split: a no-op run reads ten thousand of these."""
    first, sep, rest = head.partition(b"\r\n")
    status = _STATUS.fullmatch(first)
    if status is None or status[2].startswith(b"1"):
        raise Unusable("not an HTTP/1.x final status line")
    headers = Headers()
    if sep:
        if rest.count(b"\r\n") >= MAX_HEADERS:
            raise Unusable("too many headers")
        if _HEADER_LINES.fullmatch(rest) is None:
            raise Unusable("a malformed header line")
        for line in rest.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            key = name.lower()
            if key in headers:
                if key in _READ:
                    raise Unusable(f"{name} twice")     # which one would be meant?
                continue                                # Date twice (a proxy's, upstream's)
            headers[key] = value.strip(" \t")
    tokens = {t.strip() for t in headers.get("Connection", "").lower().split(",")}
    keep = status[1] == b"1" and "close" not in tokens
    return int(status[2]), headers, keep


def _waiting(sock) -> bool:
    """Something to read on an idle connection: bytes sent late (they would be taken for the
    next request's answer) or its end."""
    if sock is None or isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        poller = select.poll()          # not select(): no limit on the descriptor's number
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class Heads:
    """Idle connections per registry, shared by the threads (at most ``idle`` kept each;
    how many are in use at once is the resolve's concurrency per registry)."""

    def __init__(self, ca_file: str, timeout: tuple[float, float], deadline: float,
                 user_agent: str, idle: int = 8):
        self.connect_timeout, self.read_timeout = timeout
        self.deadline, self.user_agent, self.ca_file, self.idle = deadline, user_agent, \
            ca_file, idle
        self._tls: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._blocks: dict[tuple, tuple[str, str, bytes] | None] = {}
        self._lock = threading.Lock()

    def _take(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        while True:
            with self._lock:        # the look at the socket is made outside the lock
                idle = self._idle.get((scheme, netloc))
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if not _waiting(conn.sock):
                return conn
            conn.close()    # bytes no request asked for, or the registry's close
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self.connect_timeout,
                                               context=self.context())
        return http.client.HTTPConnection(netloc, timeout=self.connect_timeout)

    def context(self) -> ssl.SSLContext:
        """The TLS context of every connection (the CA bundle read once; an OSError or
        ssl.SSLError when it does not load)."""
        with self._lock:
            if self._tls is None:
                where = {"capath" if os.path.isdir(self.ca_file) else "cafile": self.ca_file}
                self._tls = ssl.create_default_context(**where)
            return self._tls

    def _give(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((scheme, netloc), [])
            if len(idle) < self.idle:
                idle.append(conn)
                return
        conn.close()

    def head(self, url: str, headers: dict[str, str]) -> tuple[int, Headers] | None:
        """(status, headers) of a HEAD of ``url``, or None when it did not come back whole."""
        cut = url.find("/", url.find("://") + 3) if "://" in url else -1
        if cut < 0:
            return None
        base, first = url[:cut], request_line(url[cut:])
        where = self.block(base, headers)
        if first is None or where is None:
            return None
        scheme, netloc, block = where
        request = first + block
        for _ in range(2):
            again, answer = self._once(scheme, netloc, request)
            if answer is not None or not again:
                return answer
        return None     # an idle connection the registry had closed, then a fresh one failed

    def block(self, base: str, headers: dict[str, str]) -> tuple[str, str, bytes] | None:
        """(scheme, netloc, header block) of requests to ``base`` (``scheme://netloc``) with
        ``headers``: checked once, not per HEAD (the few forms a run sends, kept)."""
        if not all(type(value) is str for value in headers.values()):
            return None             # never sent; nor a key of the cache
        key = (base, *headers.items())
        known = self._blocks.get(key, False)
        if known is not False:
            return known
        try:                # urlsplit drops tabs and line breaks: none may be there at all
            parts = None if _UNSAFE.search(base) else urlsplit(base)
        except ValueError:
            parts = None
        block = None
        if parts is not None and parts.scheme in ("http", "https") and parts.netloc and \
                not (parts.path or parts.query or parts.fragment):
            block = header_block(parts.netloc, {"User-Agent": self.user_agent, **headers})
        known = (parts.scheme, parts.netloc, block) if block is not None else None
        with self._lock:
            if len(self._blocks) >= 64:     # a token renewed now and then: a few at most
                self._blocks.clear()
            self._blocks[key] = known
        return known

    def _once(self, scheme: str, netloc: str, request: bytes):
        """(worth another try on a fresh connection, the answer or None)."""
        conn = reused = watch = None
        try:
            conn = self._take(scheme, netloc)
            reused = conn.sock is not None
            with Deadline(self.deadline) as watch:
                using(conn)
                if not reused:
                    conn.connect()
                    conn.sock.settimeout(self.read_timeout)
                conn.sock.sendall(request)
                status, got, keep = read_answer(conn.sock)
        except (OSError, ValueError, http.client.HTTPException, Unusable) as exc:
            if conn is not None:
                conn.close()
            # only a connection the registry closed while it sat idle is worth a new one
            # (not one the deadline cut: that registry had its time)
            stale = isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError |
                               ConnectionResetError) and not (watch and watch.fired)
            return bool(reused and stale), None
        if watch.fired:             # cut mid-header: what arrived is not an answer
            conn.close()
            return False, None
        if keep:
            self._give(scheme, netloc, conn)
        else:
            conn.close()
        return False, (status, got)

    def close(self) -> None:
        """Close the idle connections (the next HEAD opens new ones)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
