"""Retries attached once to the session: connection errors, timeouts, 5xx and 429.

Backoff is exponential with full jitter, honours ``Retry-After`` (seconds, an HTTP date, or
the Unix timestamp Docker Hub has sent) and is bounded in attempts and in total time. What
retrying cannot mend (a name that does not resolve, TLS spoken to a plain-HTTP registry) fails
at once, with a short human message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NameResolutionError, NewConnectionError, ProtocolError

from ..errors import sanitize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    seconds: float = 300.0
    base: float = 0.5
    cap: float = 60.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(self.base / 2, min(self.cap, self.base * 2 ** (attempt - 1)))


def retryable_status(status: int) -> bool:
    return status == 429 or (500 <= status < 600 and status not in (501, 505))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None when absent or unreadable."""
    if not value:
        return None
    now = time.time() if now is None else now
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    if number > 1e9:          # a Unix timestamp, not a delay
        return max(0.0, number - now)
    return max(0.0, number)


def _causes(exc: BaseException, depth: int = 0):
    """An exception and what it wraps (args, ``reason``, cause, context), a bounded walk."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__]


_OBJECT = re.compile(r"<[^<>]{0,200} object at 0x[0-9a-fA-F]+>:? ?")


def network_problem(exc: BaseException, host: str) -> tuple[str, bool]:
    """A short human reason for a failed connection, and whether trying again can help."""
    causes = list(_causes(exc))
    if any(isinstance(c, NameResolutionError) for c in causes):
        return f"cannot reach {host}: name does not resolve", False
    if any(isinstance(c, requests.exceptions.SSLError | ssl.SSLError) for c in causes):
        text = " ".join(str(c) for c in causes).lower()
        if "wrong version number" in text or "record layer failure" in text \
                or "unknown protocol" in text or "packet length too long" in text:
            return (f"cannot reach {host}: it does not speak TLS (use http://{host}/… in the "
                    "recipe for a plain-HTTP registry)"), False
        if "certificate" in text:
            return f"cannot reach {host}: its TLS certificate is not trusted", False
        return f"cannot reach {host}: TLS handshake failed", False
    within = next((str(c) for c in causes if "no answer within" in str(c)), None)
    if within:
        return f"{host}: {within}", True
    if any(isinstance(c, requests.Timeout) for c in causes) or \
            any("timed out" in str(c) for c in causes):
        return f"cannot reach {host}: timed out", True
    for c in causes:
        if isinstance(c, ConnectionRefusedError) or "Connection refused" in str(c):
            return f"cannot reach {host}: connection refused", True
        if isinstance(c, ConnectionResetError) or "reset by peer" in str(c):
            return f"{host}: connection reset", True
        if isinstance(c, NewConnectionError | ProtocolError):
            # urllib3 opens with its connection object's repr: an address that changes each run
            return f"cannot reach {host}: {sanitize(_OBJECT.sub('', str(c)), 80)}", True
    return f"cannot reach {host}: {sanitize(type(exc).__name__)}", True


_IN_FLIGHT: dict[int, object] = {}     # thread -> the urllib3 connection it is using
_IN_FLIGHT_LOCK = threading.Lock()


def using(conn) -> None:
    """Say that this thread's request goes over ``conn`` (a ``Deadline`` cuts its socket)."""
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT[threading.get_ident()] = conn


class _Tracked:
    """A urllib3 connection that says which thread uses it (for ``deadline``)."""

    def request(self, *args, **kwargs):
        using(self)
        return super().request(*args, **kwargs)


class _TrackedHTTP(_Tracked, urllib3.connection.HTTPConnection):
    pass


class _TrackedHTTPS(_Tracked, urllib3.connection.HTTPSConnection):
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTP


class _PoolS(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPS


def track(manager: urllib3.PoolManager) -> urllib3.PoolManager:
    """Make ``manager``'s connections ones a ``deadline`` can cut."""
    manager.pool_classes_by_scheme = {"http": _Pool, "https": _PoolS}
    return manager


class _Watchdog:
    """One daemon thread that cuts the connections whose deadline passed (a thread per
    request would cost more than the request)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A fresh start (also in a forked child: the parent's lock may have been held at
        the fork, and its thread is not there)."""
        self.lock = threading.Lock()
        self.watched: dict[int, tuple[float, Deadline]] = {}
        self.thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="deadlines",
                                               daemon=True)
                self.thread.start()
            self.watched[id(deadline)] = (time.monotonic() + deadline.seconds, deadline)

    def unwatch(self, deadline: Deadline) -> None:
        with self.lock:
            self.watched.pop(id(deadline), None)

    def _loop(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self.lock:
                due = [d for at, d in self.watched.values() if at <= now]
                for d in due:
                    del self.watched[id(d)]
            for d in due:
                d.cut()


_WATCHDOG = _Watchdog()


def _after_fork() -> None:
    global _IN_FLIGHT_LOCK
    _IN_FLIGHT_LOCK = threading.Lock()
    _IN_FLIGHT.clear()
    _WATCHDOG.reset()


os.register_at_fork(after_in_child=_after_fork)


class Deadline:
    """Cut the connection this thread uses when an answer's headers are not all in within
    ``seconds`` (a server may send one byte a minute: every read is within the read timeout,
    and the whole would never end)."""

    def __init__(self, seconds: float):
        self.seconds, self.fired, self.active = seconds, False, True
        self.thread = threading.get_ident()

    def cut(self) -> None:
        with _IN_FLIGHT_LOCK:       # never the connection of this thread's next request
            conn = _IN_FLIGHT.get(self.thread) if self.active else None
            sock = getattr(conn, "sock", None)
            if sock is not None:    # under the lock: __exit__ cannot be half-way meanwhile
                self.fired = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Deadline:
        _WATCHDOG.watch(self)
        return self

    def __exit__(self, *exc) -> None:
        _WATCHDOG.unwatch(self)
        with _IN_FLIGHT_LOCK:
            self.active = False
            _IN_FLIGHT.pop(self.thread, None)


class RetryAdapter(HTTPAdapter):
    """An HTTPAdapter that re-sends idempotent requests on transient failures, each try's
    headers bounded in time as a whole."""

    def __init__(self, policy: RetryPolicy, sleep=time.sleep, deadline: float = 300.0,
                 **kwargs):
        self.deadline = deadline
        super().__init__(**kwargs)
        self.policy = policy
        self.sleep = sleep

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        track(self.poolmanager)

    def _send_once(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        with Deadline(self.deadline) as watch:
            try:
                response = super().send(request, **kwargs)
            except (requests.ConnectionError, requests.Timeout):
                if watch.fired:
                    raise requests.Timeout(f"no answer within {self.deadline:g}s") from None
                raise
        if watch.fired:     # cut mid-header: http.client may take the stump for a whole answer
            response.close()
            raise requests.Timeout(f"no answer within {self.deadline:g}s")
        return response

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        deadline = time.monotonic() + self.policy.seconds
        attempt = 0
        host = request.url.split("/")[2] if request.url else "?"
        while True:
            attempt += 1
            try:
                response = self._send_once(request, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason, again = network_problem(exc, host)
                delay = self.policy.backoff(attempt)
                if not again or attempt >= self.policy.attempts \
                        or time.monotonic() + delay > deadline:
                    raise
            else:
                remaining = response.headers.get("ratelimit-remaining")
                if remaining is not None:
                    log.info("%s ratelimit-remaining %s", host, sanitize(remaining, 40))
                if not retryable_status(response.status_code):
                    return response
                delay = retry_after(response.headers.get("Retry-After"))
                if delay is None:
                    delay = self.policy.backoff(attempt)
                if attempt >= self.policy.attempts or time.monotonic() + delay > deadline:
                    return response
                reason = f"HTTP {response.status_code}"
                response.close()
            log.warning("%s %s: %s, retrying in %.1fs (attempt %d of %d)", request.method,
                        sanitize(request.url, 200), reason, delay, attempt + 1,
                        self.policy.attempts)
            self.sleep(delay)
