"""Many HEADs from one thread (``HeadRound``), against real HTTP(S) servers that misbehave:
every HEAD comes back exactly once, as an answer read strictly or as None, never as an error;
connections stay few; TLS is verified."""

from __future__ import annotations

import threading
import time

import pytest
from helpers.hostile import Answer, HostileRegistry, self_signed
from registry.test_heads import SPOILS, spoiled

from unpacked.registry.heads import Heads
from unpacked.registry.rounds import HeadRound

DIGEST = f"sha256:{'a' * 64}"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


def run_round(base: str, paths: list[str], per_host: int = 2, ca: str = SYSTEM_CA,
              headers: dict | None = None, seconds: float = 5, more=lambda: False) -> dict:
    """{index: answer} of a round asking ``paths`` of ``base`` in order."""
    left = list(enumerate(paths))
    got: dict[int, object] = {}

    def take(b: str):
        assert b == base
        if not left:
            return None
        i, path = left.pop(0)
        return i, base + path, dict(headers or {})

    def done(key, answer):
        assert key not in got, "each HEAD is answered once"
        got[key] = answer
    heads = Heads(ca, (seconds, seconds), seconds, "test")
    HeadRound(heads, per_host).run([base], take, done, more, threading.Event())
    assert sorted(got) == list(range(len(paths))), "every HEAD is answered"
    return got


def digest_of(answer) -> str | None:
    return None if answer is None else answer[1].get("Docker-Content-Digest")


def test_many_heads_over_a_few_connections(hostile):
    ports = set()

    def answer(h):
        ports.add(h.client_address[1])
        tag = h.path.rsplit("/", 1)[1]
        h.send_response(200)
        h.send_header("Docker-Content-Digest", f"sha256:{tag * 64}"[:71])
        h.send_header("Content-Length", "0")
        h.end_headers()
    hostile.on("HEAD", "/manifests/", Answer(write=answer))
    got = run_round(f"http://{hostile.host}", [f"/v2/a/manifests/{i % 10}" for i in range(300)],
                    per_host=3, headers={"Accept": "x/y"})
    assert [digest_of(got[i])[7:8] for i in range(300)] == [str(i % 10) for i in range(300)], \
        "each answer is its own request's"
    assert 1 <= len(ports) <= 3, "at most per_host connections"
    sent = [r for r in hostile.requests if r[0] == "HEAD"]
    assert len(sent) == 300 and {r[2]["Accept"] for r in sent} == {"x/y"}
    assert {r[2]["User-Agent"] for r in sent} == {"test"}


@pytest.mark.parametrize("spoil", list(SPOILS))
def test_an_answer_not_strictly_a_heads_is_handed_back_as_none(hostile, spoil):
    ports = []

    def answer(h):
        ports.append(h.client_address[1])
        spoiled(spoil, h)
    hostile.on("HEAD", "/manifests/", Answer(write=answer))
    got = run_round(f"http://{hostile.host}", ["/v2/a/manifests/v1"] * 4, per_host=1)
    assert list(got.values()) == [None] * 4
    assert len(set(ports)) == 4, "a connection that answered so is not used again"


def test_a_connection_the_registry_closed_is_replaced_and_the_head_asked_again(hostile):
    def answer_then_hang_up(h):           # no "Connection: close": the socket just goes
        h.send_response(200)
        h.send_header("Docker-Content-Digest", DIGEST)
        h.send_header("Content-Length", "0")
        h.end_headers()
        h.wfile.flush()
        time.sleep(0.05)                    # the round has sent its next HEAD by now
        h.close_connection = True
    hostile.on("HEAD", "/manifests/", Answer(write=answer_then_hang_up))
    got = run_round(f"http://{hostile.host}", ["/v2/a/manifests/v1"] * 5, per_host=1)
    assert [digest_of(a) for a in got.values()] == [DIGEST] * 5


def test_a_registry_that_never_answers_is_given_up_in_time(hostile):
    def hang(h):
        time.sleep(5)
    hostile.on("HEAD", "/manifests/", Answer(write=hang))
    start = time.monotonic()
    got = run_round(f"http://{hostile.host}", ["/v2/a/manifests/v1"] * 3, per_host=3,
                    seconds=0.5)
    assert list(got.values()) == [None] * 3 and time.monotonic() - start < 3


def test_a_registry_that_is_not_there_is_handed_back_not_raised(hostile):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # closed again: nothing listens there
    assert list(run_round(f"http://127.0.0.1:{port}", ["/v2/a/manifests/v1"] * 3).values()) \
        == [None] * 3
    assert list(run_round("http://no-such-host.invalid", ["/v2/a/manifests/v1"]).values()) \
        == [None]


def test_a_request_that_could_be_split_is_never_sent(hostile):
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    base = f"http://{hostile.host}"
    for headers, path in (({"Authorization": "Bearer a\nX-Injected: 1"}, "/v2/a/manifests/v1"),
                          ({"Host": "elsewhere"}, "/v2/a/manifests/v1"),
                          ({}, "/v2/a b/manifests/v1"),
                          ({}, "/v2/a/manifests/v1?x=1")):
        assert run_round(base, [path], headers=headers) == {0: None}
    assert not [r for r in hostile.requests if r[0] == "HEAD"], "nothing was sent"


def test_heads_let_go_later_are_asked_while_the_caller_says_more_will_come(hostile):
    """The caller holds some HEADs back (a token being fetched): the round waits for them
    while ``more`` says so, and asks them when ``take`` gives them."""
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    base = f"http://{hostile.host}"
    released = threading.Event()
    threading.Timer(0.3, released.set).start()
    handed = []
    got = {}

    def take(b):
        if not handed:
            handed.append(0)
            return 0, f"{base}/v2/a/manifests/v1", {}
        if released.is_set() and len(handed) == 1:
            handed.append(1)
            return 1, f"{base}/v2/b/manifests/v1", {}
        return None
    HeadRound(Heads(SYSTEM_CA, (5, 5), 5, "test"), 2).run(
        [base], take, got.__setitem__, lambda: len(handed) < 2, threading.Event())
    assert sorted(got) == [0, 1] and {digest_of(a) for a in got.values()} == {DIGEST}


@pytest.fixture
def tls_registry(tmp_path):
    cert, key = self_signed(tmp_path)
    reg = HostileRegistry(tls=(cert, key))
    reg.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    yield reg, cert
    reg.stop()


def test_https_is_verified_against_the_ca_bundle(tls_registry):
    reg, cert = tls_registry
    base = f"https://{reg.host}"
    got = run_round(base, ["/v2/a/manifests/v1"] * 20, per_host=3, ca=cert)
    assert {digest_of(a) for a in got.values()} == {DIGEST}
    assert run_round(base, ["/v2/a/manifests/v1"], ca=SYSTEM_CA) == {0: None}, \
        "a certificate the bundle does not vouch for is refused"
    port = reg.host.rsplit(":", 1)[1]
    assert run_round(f"https://localhost:{port}", ["/v2/a/manifests/v1"], ca=cert) == \
        {0: None}, "nor one for another name"
    assert run_round(base, ["/v2/a/manifests/v1"], ca="/nonexistent/ca.pem") == {0: None}


# -- a registry at the socket level: answers, resets, stray bytes --------------------------------

OK = f"HTTP/1.1 200 OK\r\nDocker-Content-Digest: {DIGEST}\r\nContent-Length: 0\r\n\r\n".encode()
STRAY = OK.replace(b"a" * 64, b"e" * 64)


class Raw:
    """A TCP server that runs ``handler(connection)`` for each connection it accepts."""

    def __init__(self, handler):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.handler = handler
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            conn, _ = self.sock.accept()
            self.accepted += 1
            threading.Thread(target=self.handler, args=(conn,), daemon=True).start()


def read_request(conn) -> bool:
    """A request read whole (False: the connection ended, or was ended here)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            data = conn.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        buf += data
    return True


def reset(conn) -> None:
    """Close with a TCP reset, as a load balancer dropping an idle connection does."""
    import socket
    import struct
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def round_with(port: int, count: int, take_hook=lambda n: None, done=None, host="127.0.0.1"):
    base = f"http://{host}:{port}"
    items = [(i, f"{base}/v2/a/manifests/{i}", {}) for i in range(count)]
    got: dict = {}
    calls = [0]

    def take(b):
        calls[0] += 1
        take_hook(calls[0])
        return items.pop(0) if items else None
    HeadRound(Heads(SYSTEM_CA, (3, 3), 3, "test"), 1).run(
        [base], take, done or got.__setitem__, lambda: False, threading.Event())
    return got


def test_an_idle_connection_reset_before_its_next_head_is_replaced_not_raised():
    """The registry resets the idle connection while the round is busy elsewhere: its next
    HEAD is asked on a fresh connection (the reset is never raised out of the round)."""
    gone = threading.Event()

    def handler(conn):
        if read_request(conn):
            conn.sendall(OK)
            gone.wait(5)
            reset(conn)
        while read_request(conn):
            conn.sendall(OK)
    server = Raw(handler)

    def hook(n):
        if n == 2:              # the connection is idle now: the registry drops it
            gone.set()
            time.sleep(0.2)
    got = round_with(server.port, 2, hook)
    assert [digest_of(got[i]) for i in (0, 1)] == [DIGEST, DIGEST]
    assert server.accepted == 2


def test_a_connection_reset_at_the_next_head_is_asked_again_once():
    def handler(conn):
        if read_request(conn):
            conn.sendall(OK)
        if read_request(conn):
            reset(conn)         # the second HEAD on a connection: reset, no answer
    server = Raw(handler)
    got = round_with(server.port, 3)
    assert [digest_of(got[i]) for i in range(3)] == [DIGEST] * 3


def test_bytes_sent_on_an_idle_connection_are_never_the_next_answer():
    """A registry that sends an answer nobody asked for while the connection is idle: the
    next HEAD does not take it for its own (its connection is dropped, a fresh one asked)."""
    stray, first = threading.Event(), [True]

    def handler(conn):
        if read_request(conn):
            conn.sendall(OK)
            if first and first.pop() and stray.wait(0.5):    # the first connection only
                conn.sendall(STRAY)
        while read_request(conn):
            conn.sendall(OK)
    server = Raw(handler)

    def hook(n):
        if n == 2:
            stray.set()
            time.sleep(0.2)
    got = round_with(server.port, 2, hook)
    assert [digest_of(got[i]) for i in (0, 1)] == [DIGEST, DIGEST]


def test_each_address_of_a_registry_is_tried_in_turn(monkeypatch):
    import socket
    server = Raw(lambda conn: [conn.sendall(OK) for _ in iter(lambda: read_request(conn),
                                                               False)])
    real = socket.getaddrinfo

    def two(host, port, *args, **kw):     # a dead address first, as a route-less AAAA
        if host == "registry.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 1)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", two)
    got = round_with(server.port, 3, host="registry.test")
    assert [digest_of(got[i]) for i in range(3)] == [DIGEST] * 3


def test_a_registry_slow_to_look_up_holds_up_no_other(monkeypatch):
    import socket
    server = Raw(lambda conn: [conn.sendall(OK) for _ in iter(lambda: read_request(conn),
                                                               False)])
    real = socket.getaddrinfo

    def slow(host, port, *args, **kw):
        if host == "slow.test":
            time.sleep(2)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, port, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", slow)
    fast, late = f"http://127.0.0.1:{server.port}", "http://slow.test"
    items = {fast: [(i, f"{fast}/v2/a/manifests/{i}", {}) for i in range(20)],
             late: [("late", f"{late}/v2/a/manifests/v1", {})]}
    when: dict = {}
    start = time.monotonic()

    def done(key, answer):
        when[key] = (time.monotonic() - start, answer)
    HeadRound(Heads(SYSTEM_CA, (3, 3), 3, "test"), 2).run(
        [late, fast], lambda b: items[b].pop(0) if items[b] else None, done, lambda: False,
        threading.Event())
    assert max(when[i][0] for i in range(20)) < 1.5, "the other registry went on meanwhile"
    assert when["late"][1] is None


def test_an_error_of_the_caller_is_its_own_not_a_connection_failure():
    server = Raw(lambda conn: [conn.sendall(OK) for _ in iter(lambda: read_request(conn),
                                                               False)])
    calls = []

    def done(key, answer):
        calls.append((key, answer is not None))
        raise OSError("the caller's own failure")
    with pytest.raises(OSError, match="the caller's own failure"):
        round_with(server.port, 2, done=done)
    assert calls == [(0, True)], "raised out, once; not taken for the connection's failure"
