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
blocking (verified against the same CA bundle), ``per_host`` at most per registry, each of a
registry's addresses in turn; names are looked up in threads (a slow one holds up no other).
A kept connection the registry closed or reset before a byte of the next answer is replaced
and that HEAD asked again, once; one that sent bytes nobody asked for is not used again.
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

Take = Callable[[str], tuple[object, str, dict[str, str] | None] | None]   # None: not here
Done = Callable[[object, tuple[int, Headers] | None], None]

CONNECTING, HANDSHAKE, SENDING, READING, IDLE = range(5)
WAIT = 0.05         # seconds between looks for HEADs the caller let go meanwhile
STALE = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class Closed(Unusable):
    """The registry closed the connection before a byte of the answer."""


class _Link:
    """One connection of the round: where it stands and the HEAD it carries."""

    __slots__ = ("base", "host", "sock", "state", "events", "key", "request", "out", "buf",
                 "due", "started", "reused", "address")

    def __init__(self, base: str, host: str):
        self.base, self.host = base, host
        self.sock: socket.socket | None = None
        self.state, self.events, self.address = CONNECTING, 0, 0
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
        self.addresses: dict[str, list[tuple]] = {}     # set by the look-up threads
        self.looked_up = 0.0

    def run(self, bases: list[str], take: Take, done: Done, more: Callable[[], bool],
            stop: threading.Event) -> None:
        """Until ``take`` has nothing for any registry, nothing is in flight and ``more``
        says nothing will come (or ``stop`` is set)."""
        self.take, self.done = take, done
        try:
            self._look_up(bases)
            while not stop.is_set():
                waiting = [base for base in bases if not self._ready(base)]
                for base in bases:
                    if base not in waiting:
                        self._feed(base)
                busy = [x for links in self.links.values() for x in links if x.state != IDLE]
                if not busy and not waiting and not more():
                    return
                now = time.monotonic()
                wait = min(min(x.due for x in busy) - now, 1.0) if busy else WAIT
                for key, _ in self.selector.select(max(0.0, wait)):
                    self._step(key.data)
                now = time.monotonic()
                for link in busy:
                    if link.sock is not None and link.due < now and link.state != IDLE:
                        self._failed(link, Unusable("no answer in time"))
        finally:
            for links in self.links.values():
                for link in list(links):
                    self._close(link)
            self.selector.close()

    def _look_up(self, bases: list[str]) -> None:
        """Look up the addresses of every registry at once, each in a thread: a registry
        whose name takes long to look up holds up no other (``_feed`` starts each registry
        once its addresses are there; none when not found within the connect timeout)."""
        def look_up(base: str) -> None:
            try:
                parts = urlsplit(base)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                found = socket.getaddrinfo(parts.hostname or "", port, type=socket.SOCK_STREAM)
            except (OSError, ValueError, UnicodeError):
                found = []
            self.addresses.setdefault(base, found)
        self.looked_up = time.monotonic() + self.heads.connect_timeout
        for base in bases:
            threading.Thread(target=look_up, args=(base,), daemon=True).start()

    def _ready(self, base: str) -> bool:
        """The registry's addresses are known (or its time to be looked up is over)."""
        if base in self.addresses:
            return True
        if time.monotonic() < self.looked_up:
            return False
        self.addresses.setdefault(base, [])
        return True

    # -- giving connections their HEADs -------------------------------------------------------

    def _feed(self, base: str) -> None:
        """Each idle connection of ``base`` its next HEAD; new ones while HEADs wait."""
        links = self.links.setdefault(base, [])
        for link in [x for x in links if x.state == IDLE]:
            request = self._next(base)
            if request is None:
                return
            if self._quiet(link):
                self._carry(link, *request)
                link.reused, link.state = True, SENDING
                self._step(link)
            else:
                self._close(link)   # bytes no request asked for, or its end: not used again
                self._new(base, request)
        while len(links) < self.per_host:
            request = self._next(base)
            if request is None:
                return
            self._new(base, request)

    def _new(self, base: str, request: tuple[object, bytes]) -> None:
        link = _Link(base, urlsplit(base).hostname or "")
        self.links[base].append(link)
        self._carry(link, *request)
        self._dial(link, 0)

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

    def _request(self, base: str, url: str, headers: dict[str, str] | None) -> bytes | None:
        if headers is None:
            return None
        cut = url.find("/", len(base)) if url.startswith(base + "/") else -1
        first = request_line(url[cut:]) if cut == len(base) else None
        where = self.heads.block(base, headers)
        return None if first is None or where is None else first + where[2]

    def _carry(self, link: _Link, key: object, request: bytes) -> None:
        link.key, link.request, link.out = key, request, request
        link.buf = bytearray()
        link.started = time.monotonic()
        link.due = link.started + min(self.heads.deadline, self.heads.read_timeout)

    def _dial(self, link: _Link, address: int) -> None:
        """Connect ``link`` to the registry's ``address``-th address (a failed one: the next,
        as ``socket.create_connection`` does)."""
        self._drop_socket(link)
        link.state, link.address = CONNECTING, address
        link.due = time.monotonic() + self.heads.connect_timeout
        try:
            addresses = self.addresses.get(link.base) or []
            if address >= len(addresses):
                raise OSError(errno.EHOSTUNREACH, "no address to connect to")
            family, kind, proto, _, where = addresses[address]
            link.sock = socket.socket(family, kind, proto)
            link.sock.setblocking(False)
            link.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = link.sock.connect_ex(where)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, "connect"))
            self._want(link, selectors.EVENT_WRITE)
        except (OSError, ValueError) as exc:
            self._failed(link, exc)

    # -- one connection's progress ------------------------------------------------------------

    def _step(self, link: _Link) -> None:
        """Take ``link`` as far as it goes now; its answer, once whole, to the caller."""
        key = link.key
        try:
            answer = self._progress(link)
        except (OSError, ValueError, Unusable) as exc:   # ssl.SSLError is an OSError
            self._failed(link, exc)
            return
        if answer is not None:
            self.done(key, answer)

    def _progress(self, link: _Link) -> tuple[int, Headers] | None:
        if link.state == CONNECTING:
            code = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, errno.errorcode.get(code, "connect"))
            if link.base.startswith("https://"):
                self._drop_events(link)
                link.sock = self.heads.context().wrap_socket(
                    link.sock, server_hostname=link.host, do_handshake_on_connect=False)
                link.state = HANDSHAKE
            else:
                link.state = SENDING
        if link.state == HANDSHAKE:
            try:
                link.sock.do_handshake()
            except ssl.SSLWantReadError:
                return self._want(link, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._want(link, selectors.EVENT_WRITE)
            link.state = SENDING
        if link.state == SENDING:
            try:
                sent = link.sock.send(link.out)
            except (BlockingIOError, ssl.SSLWantWriteError):
                return self._want(link, selectors.EVENT_WRITE)
            except ssl.SSLWantReadError:
                return self._want(link, selectors.EVENT_READ)
            link.out = link.out[sent:]
            if link.out:
                return self._want(link, selectors.EVENT_WRITE)
            link.state = READING
            link.due = min(link.started + self.heads.deadline,
                           time.monotonic() + self.heads.read_timeout)
            return self._want(link, selectors.EVENT_READ)
        if link.state == READING:
            return self._reading(link)
        self._close(link)       # an idle connection spoke (stray bytes) or ended
        return None

    def _reading(self, link: _Link) -> tuple[int, Headers] | None:
        head = None
        while head is None:
            try:
                chunk = link.sock.recv(16384)
            except (BlockingIOError, ssl.SSLWantReadError):
                link.due = min(link.started + self.heads.deadline,
                               time.monotonic() + self.heads.read_timeout)
                return None
            if not chunk:
                raise Closed("closed before an answer") if not link.buf else \
                    Unusable("cut short")
            head = gather(link.buf, chunk)
        status, headers, keep = parse_head(head)
        link.key = None
        if keep:
            link.state = IDLE
            self._want(link, selectors.EVENT_READ)
        else:
            self._close(link)
        return status, headers

    @staticmethod
    def _quiet(link: _Link) -> bool:
        """Nothing has come on an idle connection since its last answer, not even its end."""
        try:
            link.sock.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except OSError:
            return False
        return False

    # -- ends ---------------------------------------------------------------------------------

    def _failed(self, link: _Link, exc: BaseException) -> None:
        """What a failure of ``link`` leads to: the registry's next address, the HEAD asked
        again on a fresh connection (once: a connection the registry had closed while it sat
        idle), or the HEAD handed back."""
        if link.state == CONNECTING and link.address + 1 < len(self.addresses.get(link.base)
                                                                or ()):
            self._dial(link, link.address + 1)
        elif link.reused and not link.buf and link.key is not None and \
                link.key not in self.retried and isinstance(exc, (Closed, *STALE)):
            self.retried.add(link.key)
            self.again.setdefault(link.base, []).append((link.key, link.request))
            link.key = None
            self._close(link)
        else:
            key, link.key = link.key, None
            self._close(link)
            if key is not None:
                self.done(key, None)

    def _close(self, link: _Link) -> None:
        self._drop_socket(link)
        links = self.links.get(link.base, [])
        if link in links:
            links.remove(link)

    def _drop_socket(self, link: _Link) -> None:
        if link.sock is not None:
            self._drop_events(link)
            link.sock.close()
            link.sock = None

    def _drop_events(self, link: _Link) -> None:
        if link.events:
            self.selector.unregister(link.sock)
            link.events = 0

    def _want(self, link: _Link, events: int) -> None:
        if link.events == events:
            return
        if link.events:
            self.selector.modify(link.sock, events, link)
        else:
            self.selector.register(link.sock, events, link)
        link.events = events
