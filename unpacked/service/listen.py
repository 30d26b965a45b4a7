"""``unpacked listen``: registry notifications in, conversions out, seconds after a push.

The HTTP side only checks and records: the shared secret (``Authorization``), the size of the
body, the rate of each source, the format of the events; the images a recipe wants are
written to ``cache/listen/pending/`` (fsynced) *before* the ``202``, so a crash or a restart
loses none. A worker thread waits for a short quiet spell (setting ``listen_debounce``),
then converts everything pending in one run of ``unpacked convert --wait`` (the same tasks,
locks and transaction as cron's run, which stays the safety net). ``/metrics`` serves the last
run's numbers and the queue's length.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import UnpackedError, sanitize
from ..recipe import read
from ..settings import Settings
from . import events

log = logging.getLogger("unpacked.listen")

MAX_BODY = 1 << 20
MAX_PENDING = 10_000
RATE = 20.0                  # requests per second per source, sustained
BURST = 40.0
RETRY_SECONDS = 30.0         # after a conversion run that could not start


class Queue:
    """Images waiting to be converted, one fsynced file per accepted notification."""

    def __init__(self, folder: Path):
        self.folder = folder / "pending"
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.changed = threading.Condition()

    def add(self, names: list[str]) -> None:
        name = f"{time.time_ns()}-{secrets.token_hex(4)}.json"
        tmp = self.folder / f".{name}"
        with open(tmp, "w") as f:
            json.dump(names, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.changed:
            self.changed.notify_all()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.json") if not p.name.startswith("."))

    def take(self) -> tuple[list[Path], list[str]]:
        files, names = self.files(), []
        for path in files:
            with contextlib.suppress(OSError, ValueError):
                names += [n for n in json.loads(path.read_text()) if isinstance(n, str)]
        return files, sorted(set(names))

    def length(self) -> int:
        return len(self.take()[1])

    def done(self, files: list[Path]) -> None:
        for path in files:
            path.unlink(missing_ok=True)


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
    """A token bucket per source address."""

    def __init__(self):
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, source: str) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(source, (BURST, now))
            tokens = min(BURST, tokens + (now - last) * RATE)
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
        self.limiter = Limiter()
        self.counts = {"accepted": 0, "ignored": 0, "refused": 0, "runs": 0}
        self.stopping = threading.Event()

    # -- the HTTP side ------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self.secret is None:
            return True
        given = (header or "").encode()
        return any(hmac.compare_digest(given, f"{prefix}{self.secret}".encode())
                   for prefix in ("", "Bearer ", "Token "))

    def accept(self, body: bytes) -> tuple[int, str]:
        """(status, reason) of one notification, its wanted images queued before 202."""
        try:
            pushed = events.pushes(body)
        except events.BadEvent as exc:
            return 400, str(exc)
        names = [p.ref.name for p in pushed if self.wanted(p.ref)]
        for p in pushed:
            if p.ref.name not in names:
                log.debug("not wanted by any recipe: %s", p.ref)
        if not names:
            self.counts["ignored"] += 1
            return 202, "nothing wanted"
        if self.queue.length() + len(names) > MAX_PENDING:
            return 503, f"more than {MAX_PENDING} images pending"
        self.queue.add(names)
        self.counts["accepted"] += 1
        log.info("queued %s", ", ".join(names))
        return 202, f"queued {len(names)}"

    def metrics(self) -> str:
        from ..build.status import read_status, render
        extra = [
            "# HELP unpacked_listen_queue_length Images waiting to be converted.",
            "# TYPE unpacked_listen_queue_length gauge",
            f"unpacked_listen_queue_length {self.queue.length()}",
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
        """Wait for pending images and a quiet spell, then convert them all in one run."""
        debounce = self.settings.listen_debounce
        while not self.stopping.is_set():
            with self.queue.changed:
                if not self.queue.files():
                    self.queue.changed.wait(timeout=5)
                    continue
            first, last = time.monotonic(), len(self.queue.files())
            while not self.stopping.is_set():
                time.sleep(debounce / 4 or 0.05)
                now = len(self.queue.files())
                quiet = now == last and time.monotonic() - first >= debounce
                if quiet or time.monotonic() - first > max(10 * debounce, 1.0):
                    break
                last = now
            self.convert()

    def convert(self) -> None:
        files, names = self.queue.take()
        if not names:
            self.queue.done(files)
            return
        self.counts["runs"] += 1
        argv = [sys.executable, "-m", "unpacked", "convert", "--wait", "3600", "--project",
                str(self.project), *names]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True)
        log.info("converted %d image(s) in %.1fs (exit %d)", len(names),
                 time.monotonic() - started, done.returncode)
        for line in (done.stdout + done.stderr).splitlines()[-20:]:
            log.info("  %s", sanitize(line, 300))
        if done.returncode in (0, 1):
            self.queue.done(files)     # failures: the cron run retries them
        else:
            time.sleep(RETRY_SECONDS)  # could not run at all: keep them, try later


def handler(listener: Listener):
    class Handler(BaseHTTPRequestHandler):
        server_version = "unpacked-listen"

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
                self.answer(200, "ok")
            else:
                self.answer(404, "not found")

        def do_POST(self):
            source = self.client_address[0]
            if not listener.limiter.allow(source):
                listener.counts["refused"] += 1
                return self.answer(429, "too many requests")
            if not listener.authorized(self.headers.get("Authorization")):
                listener.counts["refused"] += 1
                log.warning("%s: notification refused: wrong or missing secret", source)
                return self.answer(401, "unauthorized")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                return self.answer(411, "Content-Length required")
            if int(length) > MAX_BODY:
                listener.counts["refused"] += 1
                self.close_connection = True
                return self.answer(413, f"larger than {MAX_BODY} bytes")
            status, reason = listener.accept(self.rfile.read(int(length)))
            if status >= 400:
                listener.counts["refused"] += 1
                log.warning("%s: notification refused (%d): %s", source, status,
                            sanitize(reason, 200))
            self.answer(status, reason)
    return Handler


def secret_of(settings: Settings, insecure: bool) -> str | None:
    if settings.listen_secret:
        return settings.listen_secret
    if settings.listen_secret_file:
        try:
            text = settings.listen_secret_file.read_text().strip()
        except OSError as exc:
            raise UnpackedError(f"listen_secret_file {settings.listen_secret_file}: "
                                f"{exc.strerror or exc}") from None
        if text:
            return text
    if insecure:
        return None
    raise UnpackedError("no shared secret: set listen_secret or listen_secret_file (the "
                        "registry sends it as Authorization), or pass --insecure-no-auth")


def serve(settings: Settings, bind: str, project: Path, insecure: bool = False) -> None:
    """Run until SIGTERM/SIGINT."""
    secret = secret_of(settings, insecure)
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        raise UnpackedError(f"--bind {bind!r}: not host:port")
    listener = Listener(settings, secret, project)
    try:
        server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler(listener))
    except OSError as exc:
        raise UnpackedError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    worker = threading.Thread(target=listener.work, daemon=True)
    worker.start()
    log.warning("listening on %s (%s pending)", bind, listener.queue.length())
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        listener.stopping.set()
        server.server_close()
