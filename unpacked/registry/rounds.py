"""Many manifest HEADs from one thread: a round over non-blocking connections.

A no-op run is a HEAD per image. Made by threads, each on its own connection, ten thousand
HEADs cost 0.9 s of CPU (most of it handing the GIL from thread to thread); from one thread
that waits on every connection at once, as curl does, 0.56 s (measured against the bench's
registry, eight connections each way). On two cores that CPU is taken from the registry.

The round asks its caller for the next HEAD whenever a connection of a registry is free
(``take``), so the caller decides what is asked and when (it holds back the tags of a
repository whose token is being fetched), and hands each answer back (``done``): the status
and headers, read as strictly as ``Heads`` reads them, or None for anything else (a
connection that failed, an answer not strictly a HEAD's, a deadline passed): the caller then
asks that tag on the full path. Connections are opened and their TLS handshakes made without
blocking (verified against the same CA bundle), ``per_host`` at most per registry.
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .heads import Headers, Heads, Unusable, gather, parse_head, request_line

Take = Callable[[str], tuple[object, str, dict[str, str]] | None]
Done = Callable[[object, tuple[int, Headers] | None], None]

CONNECTING, HANDSHAKE, SENDING, READING, IDLE = range(5)
WAIT = 0.05         # seconds between looks for HEADs the caller let go meanwhile


class _Link:
    """One connection of the round: where it stands and the HEAD it carries."""

    __slots__ = ("base", "sock", "state", "key", "request", "out", "buf", "due", "started",
                 "reused", "host", "events")

    def __init__(self, base: str, host: str):
        self.base, self.host = base, host
        self.sock: socket.socket | None = None
        self.state, self.events = CONNECTING, 0
        self.key: object = None
        self.request = self.out = b""
        self.buf = bytearray()
        self.due = self.started = 0.0
        self.reused = False


class HeadRound:
    """One round of HEADs to the registries ``bases`` (``scheme://netloc`` each)."""

    def __init__(self, heads: Heads, per_host: int):
        self.heads, self.per_host = heads, max(1, per_host)
        self.selector = selectors.DefaultSelector()
        self.links: dict[str, list[_Link]] = {}
        self.retried: set[object] = set()       # keys asked again after a stale connection
        self.again: dict[str, list[tuple[object, bytes]]] = {}
        self.addresses: dict[str, tuple] = {}   # each registry's name looked up once

    def run(self, bases: list[str], take: Take, done: Done, more: Callable[[], bool],
            stop: threading.Event) -> None:
        """Until ``take`` has nothing for any registry, nothing is in flight and ``more``
        says nothing will come (or ``stop`` is set)."""
        self.take, self.done = take, done
        try:
            while not stop.is_set():
                for base in bases:
                    self._feed(base)
                busy = [x for links in self.links.values() for x in links if x.state != IDLE]
                if not busy and not more():
                    return
                now = time.monotonic()
                wait = min(min(x.due for x in busy) - now, 1.0) if busy else WAIT
                for key, _ in self.selector.select(max(0.0, wait)):
                    self._step(key.data)
                now = time.monotonic()
                for link in busy:
                    if link.sock is not None and link.due < now and link.state != IDLE:
                        self._fail(link, Unusable("no answer in time"))
        finally:
            for links in self.links.values():
                for link in links:
                    self._close(link)
            self.selector.close()

    # -- giving connections their HEADs -------------------------------------------------------

    def _feed(self, base: str) -> None:
        """Each idle connection of ``base`` its next HEAD; new ones while HEADs wait."""
        links = self.links.setdefault(base, [])
        for link in [x for x in links if x.state == IDLE]:
            request = self._next(base)
            if request is None:
                return
            self._send(link, *request)
        while len(links) < self.per_host:
            request = self._next(base)
            if request is None:
                return
            self._open(base, *request)

    def _next(self, base: str) -> tuple[object, bytes] | None:
        """The next request to ``base``, checked (a HEAD that cannot be asked strictly is
        handed back at once)."""
        again = self.again.get(base)
        if again:
            return again.pop()
        while True:
            item = self.take(base)
            if item is None:
                return None
            key, url, headers = item
            request = self._request(base, url, headers)
            if request is not None:
                return key, request
            self.done(key, None)

    def _request(self, base: str, url: str, headers: dict[str, str]) -> bytes | None:
        cut = url.find("/", len(base)) if url.startswith(base + "/") else -1
        first = request_line(url[cut:]) if cut == len(base) else None
        where = self.heads.block(base, headers)
        return None if first is None or where is None else first + where[2]

    def _open(self, base: str, key: object, request: bytes) -> None:
        parts = urlsplit(base)
        link = _Link(base, parts.hostname or "")
        self.links[base].append(link)
        self._carry(link, key, request)
        link.due = link.started + self.heads.connect_timeout
        try:
            if base not in self.addresses:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                self.addresses[base] = socket.getaddrinfo(link.host, port,
                                                          type=socket.SOCK_STREAM)[0]
            family, kind, proto, _, address = self.addresses[base]
            link.sock = socket.socket(family, kind, proto)
            link.sock.setblocking(False)
            link.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = link.sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, "connect"))
            self._want(link, selectors.EVENT_WRITE)
        except (OSError, ValueError, UnicodeError) as exc:
            self._fail(link, exc)

    def _carry(self, link: _Link, key: object, request: bytes) -> None:
        link.key, link.request, link.out = key, request, request
        link.buf = bytearray()
        link.started = time.monotonic()
        link.due = min(link.started + self.heads.deadline,
                       link.started + self.heads.read_timeout)

    def _send(self, link: _Link, key: object, request: bytes) -> None:
        self._carry(link, key, request)
        link.reused, link.state = True, SENDING
        self._sending(link)

    # -- one connection's progress ------------------------------------------------------------

    def _step(self, link: _Link) -> None:
        try:
            if link.state == CONNECTING:
                code = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, errno.errorcode.get(code, "connect"))
                self._connected(link)
            elif link.state == HANDSHAKE:
                self._handshake(link)
            elif link.state == SENDING:
                self._sending(link)
            elif link.state == READING:
                self._reading(link)
            else:
                self._close(link)       # an idle connection spoke (stray bytes) or closed
        except (OSError, ValueError, Unusable) as exc:   # ssl.SSLError is an OSError
            self._fail(link, exc)

    def _connected(self, link: _Link) -> None:
        if not link.base.startswith("https://"):
            link.state = SENDING
            self._sending(link)
            return
        self.selector.unregister(link.sock)
        link.events = 0
        link.sock = self.heads.context().wrap_socket(
            link.sock, server_hostname=link.host, do_handshake_on_connect=False)
        link.state = HANDSHAKE
        self._handshake(link)

    def _handshake(self, link: _Link) -> None:
        try:
            link.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(link, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(link, selectors.EVENT_WRITE)
            return
        link.state = SENDING
        self._sending(link)

    def _sending(self, link: _Link) -> None:
        try:
            sent = link.sock.send(link.out)
        except (BlockingIOError, ssl.SSLWantWriteError):
            self._want(link, selectors.EVENT_WRITE)
            return
        except ssl.SSLWantReadError:
            self._want(link, selectors.EVENT_READ)
            return
        link.out = link.out[sent:]
        if link.out:
            self._want(link, selectors.EVENT_WRITE)
            return
        link.state = READING
        link.due = min(link.started + self.heads.deadline,
                       time.monotonic() + self.heads.read_timeout)
        self._want(link, selectors.EVENT_READ)

    def _reading(self, link: _Link) -> None:
        head = None
        while head is None:
            chunk = self._recv(link)
            if chunk is None:
                link.due = min(link.started + self.heads.deadline,
                               time.monotonic() + self.heads.read_timeout)
                return
            if not chunk:
                if not link.buf and link.reused and link.key not in self.retried:
                    self._ask_again(link)           # an idle connection the registry closed
                    return
                raise Unusable("closed before the answer ended")
            head = gather(link.buf, chunk)
        status, headers, keep = parse_head(head)
        key = link.key
        if keep and self._recv(link) is not None:   # bytes no request asked for, or the end
            keep = False
        if keep:
            link.state, link.key = IDLE, None
            self._want(link, selectors.EVENT_READ)
        else:
            self._close(link)
        self.done(key, (status, headers))

    @staticmethod
    def _recv(link: _Link) -> bytes | None:
        """What arrived (b"" at the end), None when nothing has yet."""
        sock = link.sock
        try:
            return sock.recv(16384)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None

    # -- ends ---------------------------------------------------------------------------------

    def _ask_again(self, link: _Link) -> None:
        """The HEAD goes out again on a fresh connection (once per HEAD)."""
        self.retried.add(link.key)
        self.again.setdefault(link.base, []).append((link.key, link.request))
        link.key = None
        self._close(link)

    def _fail(self, link: _Link, exc: BaseException) -> None:
        key, link.key = link.key, None
        self._close(link)
        if key is not None:
            self.done(key, None)

    def _close(self, link: _Link) -> None:
        if link.sock is not None:
            if link.events:
                self.selector.unregister(link.sock)
            link.sock.close()
            link.sock, link.events = None, 0
        links = self.links.get(link.base, [])
        if link in links:
            links.remove(link)

    def _want(self, link: _Link, events: int) -> None:
        if link.events == events:
            return
        if link.events:
            self.selector.modify(link.sock, events, link)
        else:
            self.selector.register(link.sock, events, link)
        link.events = events
