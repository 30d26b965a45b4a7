"""``unpacked listen``: registry notifications in, conversions out, seconds after a push.

The HTTP side only checks and records: the shared secret (``Authorization``) first, then the
size of the body and the format of the events; the images a recipe wants are written to
``cache/listen/pending/`` (one fsynced file per image) *before* the ``202``, so a crash or a
restart loses none. Connections are bounded in number (overall and per source) and in time,
so a client that never finishes its request cannot starve the registry's. A worker thread
waits for a short quiet spell (setting ``listen_debounce``), then converts what is pending in
runs of ``unpacked convert --wait`` (the same tasks, locks and transaction as cron's run,
which stays the safety net). On SIGTERM the listener stops accepting and waits for the
conversion it started, so a stop never cuts a publish. ``/metrics`` serves the last run's
numbers and the queue's length; ``/healthz`` fails when conversions cannot run.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import EXIT_BUSY, EXIT_FAILED, UnpackedError, sanitize
from ..recipe import read
from ..reference import parse
from ..repo.fs import Dir
from ..settings import Settings
from . import events

log = logging.getLogger("unpacked.listen")

MAX_BODY = 1 << 20
MAX_PENDING = 10_000         # images waiting
BATCH = 500                  # images per conversion run
CONNECTIONS = 64             # open at once, overall ...
PER_SOURCE = 16              # ... and from one address
REQUEST_SECONDS = 30.0       # a whole request, headers and body
RATE = 5.0                   # refused requests per second per source, sustained
BURST = 20.0
POST_RATE = 50.0             # accepted notifications per second per source, sustained (a
POST_BURST = 200.0           # registry retries a 429 later: the events are not lost)
RETRY_SECONDS = 30.0         # after a conversion run that could not start ...
RETRY_MAX = 600.0            # ... doubling up to this
STALE_SECONDS = 7200.0       # /healthz fails when an image waits longer
NOTED = 60.0                 # refusals from one source are logged once a minute


class Queue:
    """Images waiting to be converted: one fsynced file per image name (a repeated push
    rewrites it), each with a token that says which push it records."""

    def __init__(self, folder: Path):
        self.folder = folder / "pending"
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.changed = threading.Condition()
        self.items: dict[str, tuple[str, float]] = {}      # name -> (token, first queued)
        self.generation = 0
        self._load()

    @staticmethod
    def _file(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:32] + ".json"

    def _load(self) -> None:
        """What a previous listener left; a file that is not one of ours is set aside."""
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith("."):                  # a write a crash cut short
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not path.is_file():
                continue
            try:
                doc = json.loads(path.read_text())
                name, token, at = doc["name"], doc["token"], float(doc["at"])
                if not isinstance(name, str) or not isinstance(token, str) \
                        or path.name != self._file(name) or parse(name).name != name:
                    raise ValueError("not a pending image")
            except (OSError, ValueError, TypeError, KeyError, UnpackedError) as exc:
                bad = self.folder.parent / "bad"
                bad.mkdir(exist_ok=True, mode=0o700)
                with contextlib.suppress(OSError):
                    path.replace(bad / path.name)
                log.warning("pending/%s: %s; moved to %s", sanitize(path.name, 80),
                            sanitize(exc, 100), bad)
                continue
            self.items[name] = (token, at)

    def add(self, names: list[str]) -> None:
        now = time.time()
        with self.changed, Dir.root(self.folder, create=True) as folder:
            for name in names:
                token = secrets.token_hex(8)
                first = self.items.get(name, (None, now))[1]
                folder.write_file(self._file(name), json.dumps(
                    {"name": name, "token": token, "at": first}).encode(), 0o600, sync=True)
                self.items[name] = (token, first)
            folder.fsync()                  # the names, once for the batch, before the 202
            self.generation += 1
            self.changed.notify_all()

    def room_for(self, names: list[str]) -> bool:
        with self.changed:
            return len(self.items) + len(set(names) - set(self.items)) <= MAX_PENDING

    def take(self, limit: int) -> dict[str, str]:
        """Up to ``limit`` names, oldest first, with the token each has now."""
        with self.changed:
            oldest = sorted(self.items.items(), key=lambda kv: kv[1][1])[:limit]
            return {name: token for name, (token, _) in oldest}

    def done(self, taken: dict[str, str]) -> None:
        """Forget what was converted, unless pushed again since it was taken."""
        with self.changed:
            for name, token in taken.items():
                if self.items.get(name, ("",))[0] == token:
                    del self.items[name]
                    with contextlib.suppress(OSError):
                        (self.folder / self._file(name)).unlink()

    def oldest(self) -> float | None:
        with self.changed:
            return min((at for _, at in self.items.values()), default=None)

    def __len__(self) -> int:
        with self.changed:
            return len(self.items)


class Wanted:
    """Which pushed images a recipe wants (recipes re-read when they change)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._stamp: tuple = ()
        self._inputs: list = []

    def _load(self) -> None:
        path = self.settings.recipe_path
        files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
        stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())
        if stamp != self._stamp:
            self._stamp = stamp
            self._inputs = [i for r in read(path).recipes for i in r.inputs]

    def __call__(self, ref) -> bool:
        from ..build.single import wants
        self._load()
        return any(wants(item, ref) for item in self._inputs)


class Limiter:
    """A token bucket per source address. Refused requests and authorized ones have a
    bucket each: a registry that knows the secret is never slowed by someone who does not."""

    def __init__(self, rate: float = RATE, burst: float = BURST):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, source: str) -> bool:
        now = time.monotonic()
        with self.lock:
            if len(self.buckets) > 10_000:              # forget the idle ones
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
            tokens, last = self.buckets.get(source, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self.buckets[source] = (tokens, now)
                return False
            self.buckets[source] = (tokens - 1, now)
            return True


class Listener:
    def __init__(self, settings: Settings, secret: str | None, project: Path):
        self.settings, self.secret, self.project = settings, secret, project
        self.queue = Queue(settings.cache_dir / "listen")
        self.wanted = Wanted(settings)
        self.refusals = Limiter()
        self.posts = Limiter(POST_RATE, POST_BURST)
        self.counts = {"accepted": 0, "ignored": 0, "refused": 0, "limited": 0, "runs": 0}
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.worker: threading.Thread | None = None
        self.trouble = ""                # why conversions cannot run now (for /healthz)
        self._noted: dict[str, float] = {}

    # -- the HTTP side ------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self.secret is None:
            return True
        given = (header or "").encode()
        return any(hmac.compare_digest(given, f"{prefix}{self.secret}".encode())
                   for prefix in ("", "Bearer ", "Token "))

    def gate(self, source: str, authorization: str | None, length: str) -> tuple[int, str] | None:
        """The answer to a request refused before its body is read; None: read it."""
        if not self.authorized(authorization):
            if not self.refusals.allow(source):
                self.counts["refused"] += 1
                return 429, "too many requests"
            self.note_refusal(source, "wrong or missing secret")
            return 401, "unauthorized"
        if not self.posts.allow(source):
            self.note_refusal(source, f"more than {POST_RATE:g} notifications a second",
                              kind="limited")
            return 429, "too many requests"
        if not _LENGTH.fullmatch(length):
            return 411, "Content-Length required"
        if int(length) > MAX_BODY:
            self.counts["refused"] += 1
            return 413, f"larger than {MAX_BODY} bytes"
        return None

    def note_refusal(self, source: str, why: str, kind: str = "refused") -> None:
        """A warning per source, kind and minute at most (a flood must not flood the log)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if len(self._noted) > 10_000:       # many sources (IPv6): forget the quiet ones
            self._noted = {k: t for k, t in self._noted.items() if now - t < NOTED}
        if now - self._noted.get(f"{kind} {source}", -NOTED) >= NOTED:
            self._noted[f"{kind} {source}"] = now
            log.warning("%s: notification refused: %s", source, sanitize(why, 200))

    def accept(self, body: bytes) -> tuple[int, str]:
        """(status, reason) of one notification, its wanted images queued before 202."""
        try:
            found = events.pushes(body)
        except events.BadEvent as exc:
            return 400, str(exc)
        for why in found.skipped[:5]:
            log.warning("an event skipped: %s", why)
        names = list(dict.fromkeys(p.ref.name for p in found.pushes if self.wanted(p.ref)))
        for p in found.pushes:
            if p.ref.name not in names:
                log.debug("not wanted by any recipe: %s", p.ref)
        if not names:
            self.counts["ignored"] += 1
            return 202, "nothing wanted"
        if not self.queue.room_for(names):
            return 503, f"more than {MAX_PENDING} images pending"
        self.queue.add(names)
        self.counts["accepted"] += 1
        log.info("queued %s", sanitize(", ".join(names), 500))
        return 202, f"queued {len(names)}"

    def health(self) -> tuple[int, str]:
        if self.worker is not None and not self.worker.is_alive() and \
                not self.stopping.is_set():
            return 503, "the conversion worker stopped"
        if self.trouble:
            return 503, self.trouble
        oldest = self.queue.oldest()
        if oldest is not None and time.time() - oldest > STALE_SECONDS:
            return 503, f"an image has waited {time.time() - oldest:.0f}s to be converted"
        return 200, "ok"

    def metrics(self) -> str:
        from ..build.status import read_status, render
        extra = [
            "# HELP unpacked_listen_queue_length Images waiting to be converted.",
            "# TYPE unpacked_listen_queue_length gauge",
            f"unpacked_listen_queue_length {len(self.queue)}",
            "# HELP unpacked_listen_requests_total Notifications received, by outcome.",
            "# TYPE unpacked_listen_requests_total counter",
        ] + [f'unpacked_listen_requests_total{{outcome="{k}"}} {v}'
             for k, v in sorted(self.counts.items()) if k != "runs"] + [
            "# HELP unpacked_listen_runs_total Conversion runs started by notifications.",
            "# TYPE unpacked_listen_runs_total counter",
            f"unpacked_listen_runs_total {self.counts['runs']}"]
        return render(read_status(self.settings.cache_dir), extra)

    # -- the converting side ------------------------------------------------------------------

    def work(self) -> None:
        """Wait for pending images and a quiet spell, then convert them; a pass that fails
        in an unexpected way is logged and tried again later, never ends the worker."""
        delay = RETRY_SECONDS
        while not self.stopping.is_set():
            with self.queue.changed:
                if not len(self.queue.items):
                    self.queue.changed.wait(timeout=5)
                    continue
            self._quiet_spell()
            if self.stopping.is_set():
                return
            try:
                ok = self.convert()
            except Exception as exc:        # noqa: BLE001 - the worker must outlive it
                log.error("conversion pass failed: %s: %s", type(exc).__name__,
                          sanitize(exc, 300))
                self.trouble = f"the last conversion pass failed: {sanitize(exc, 200)}"
                ok = False
            if ok:
                delay = RETRY_SECONDS
            else:
                self.stopping.wait(delay)
                delay = min(2 * delay, RETRY_MAX)

    def _quiet_spell(self) -> None:
        debounce = self.settings.listen_debounce
        first, seen = time.monotonic(), self.queue.generation
        since = first
        while not self.stopping.is_set():
            self.stopping.wait(min(debounce / 4, 0.5) or 0.05)
            now = time.monotonic()
            if self.queue.generation != seen:
                seen, since = self.queue.generation, now
            if now - since >= debounce or now - first > max(10 * debounce, 1.0):
                return

    def convert(self) -> bool:
        """One conversion run of (up to BATCH of) what is pending; False: try again later."""
        taken = self.queue.take(BATCH)
        unwanted = {n: t for n, t in taken.items() if not self.wanted(parse(n))}
        if unwanted:
            log.info("no recipe wants %s any more; dropped", ", ".join(unwanted))
            self.queue.done(unwanted)
        names = [n for n in taken if n not in unwanted]
        if not names:
            return True
        self.counts["runs"] += 1
        argv = [sys.executable, "-m", "unpacked", "convert", "--wait", "3600", "--project",
                str(self.project), "--", *names]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNPACKED_LISTEN_")}
        started = time.monotonic()
        self.child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)   # signals: forwarded, see stop
        output, _ = self.child.communicate()
        code, self.child = self.child.returncode, None
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "converted %d image(s) in %.1fs (exit %d)", len(names),
                time.monotonic() - started, code)
        for line in output.splitlines()[-20:]:
            log.log(level, "  %s", sanitize(line, 300))
        if code in (0, EXIT_FAILED):
            self.queue.done(taken)      # failures: the cron run retries them
            self.trouble = ""
            return True
        if code != EXIT_BUSY and code < 128:
            last = sanitize(output.strip().splitlines()[-1] if output.strip() else "", 200)
            self.trouble = f"conversions cannot run (exit {code}): {last}"
        return False                     # kept: busy, interrupted or misconfigured

    def stop(self) -> None:
        """Stop converting: the running conversion is asked to stop (it aborts its
        transaction, never cuts a publish) and waited for; its images stay pending."""
        self.stopping.set()
        child = self.child
        if child is not None:
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGTERM)
        if self.worker is not None:
            self.worker.join()


class Server(ThreadingHTTPServer):
    """Connections bounded in number, overall and per source, and each in time."""

    daemon_threads = True

    def __init__(self, address: tuple, handler_class, family: int = socket.AF_INET):
        self.address_family = family
        self.slots = threading.BoundedSemaphore(CONNECTIONS)
        self.per_source: dict[str, int] = {}
        self.count_lock = threading.Lock()
        super().__init__(address, handler_class)

    def process_request(self, request, client_address) -> None:
        source = client_address[0]
        with self.count_lock:
            crowded = self.per_source.get(source, 0) >= PER_SOURCE
            if not crowded:
                self.per_source[source] = self.per_source.get(source, 0) + 1
        if crowded or not self.slots.acquire(blocking=False):
            if not crowded:
                self._leave(source)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        cut = threading.Timer(REQUEST_SECONDS, _cut, (request,))
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self.slots.release()
            self._leave(client_address[0])

    def _leave(self, source: str) -> None:
        with self.count_lock:
            left = self.per_source.get(source, 1) - 1
            if left:
                self.per_source[source] = left
            else:
                self.per_source.pop(source, None)


def _cut(request: socket.socket) -> None:
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


_LENGTH = re.compile(r"[0-9]{1,9}")


def handler(listener: Listener):
    class Handler(BaseHTTPRequestHandler):
        server_version = "unpacked-listen"
        timeout = 10                        # each read; REQUEST_SECONDS bounds the whole

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.client_address[0], sanitize(fmt % args, 200))

        def answer(self, status: int, text: str, kind: str = "text/plain") -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/metrics":
                self.answer(200, listener.metrics(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                self.answer(*listener.health())
            else:
                self.answer(404, "not found")

        def do_POST(self):
            source = self.client_address[0]
            length = self.headers.get("Content-Length", "")
            early = listener.gate(source, self.headers.get("Authorization"), length)
            if early:
                self.close_connection = True
                return self.answer(*early)
            status, reason = listener.accept(self.rfile.read(int(length)))
            if status >= 400:
                listener.note_refusal(source, f"({status}) {reason}")
            self.answer(status, reason)
    return Handler


def secret_of(settings: Settings, insecure: bool) -> str | None:
    if settings.listen_secret:
        return settings.listen_secret
    path = settings.listen_secret_file
    if path:
        try:
            text = path.read_text().strip()
            if path.stat().st_mode & 0o077:
                log.warning("listen_secret_file %s: others can read it (chmod 600)", path)
        except OSError as exc:
            raise UnpackedError(f"listen_secret_file {path}: {exc.strerror or exc}") from None
        if text:
            return text
    if insecure:
        return None
    raise UnpackedError("no shared secret: set listen_secret or listen_secret_file (the "
                        "registry sends it as Authorization), or pass --insecure-no-auth")


def address(bind: str) -> tuple[tuple[str, int], int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (loopback) -> (address, family)."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):([0-9]{1,5})", bind)
    if not match or not 0 < int(match[3]) < 65536:
        raise UnpackedError(f"--bind {bind!r}: not host:port, [v6 address]:port or :port")
    if match[1]:
        return (match[1], int(match[3])), socket.AF_INET6
    return (match[2] or "127.0.0.1", int(match[3])), socket.AF_INET


def serve(settings: Settings, bind: str, project: Path, insecure: bool = False) -> None:
    """Run until SIGTERM/SIGINT; then let the running conversion end before returning."""
    secret = secret_of(settings, insecure)
    where, family = address(bind)
    listener = Listener(settings, secret, project)
    try:
        server = Server(where, handler(listener), family)
    except OSError as exc:
        raise UnpackedError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    listener.worker = threading.Thread(target=listener.work, name="convert", daemon=True)
    listener.worker.start()
    log.warning("listening on %s (%d pending)", bind, len(listener.queue))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if listener.child is not None:
            log.warning("stopping: waiting for the running conversion to end")
        listener.stop()
