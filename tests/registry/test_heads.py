"""The lean HEAD path of a re-resolve, against a real HTTP server that misbehaves: it keeps
its connections few, survives a registry that drops idle ones, and never raises."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.hostile import Answer

from unpacked.registry.heads import Heads

DIGEST = f"sha256:{'a' * 64}"


def heads(**kw) -> Heads:
    return Heads("/etc/ssl/certs/ca-certificates.crt", (5, 5), 5, "test", **kw)


def test_an_idle_connection_the_registry_closed_is_replaced_not_given_up(hostile):
    def answer_then_hang_up(h):           # no "Connection: close": the socket just goes
        h.send_response(200)
        h.send_header("Docker-Content-Digest", DIGEST)
        h.send_header("Content-Length", "0")
        h.end_headers()
        h.close_connection = True
    hostile.on("HEAD", "/manifests/", Answer(write=answer_then_hang_up))
    lean = heads()
    url = f"http://{hostile.host}/v2/a/manifests/v1"
    for _ in range(3):
        status, got = lean.head(url, {})
        assert status == 200 and got["Docker-Content-Digest"] == DIGEST


def test_connections_are_shared_by_threads_and_capped(hostile):
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    lean = heads(idle=3)

    def one(i: int) -> int:
        return lean.head(f"http://{hostile.host}/v2/a/manifests/t{i}", {})[0]
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(200))) == {200}
    kept = [c for conns in lean._idle.values() for c in conns]
    assert 1 <= len(kept) <= 3, "at most `idle` connections stay open per registry"
    lean.close()
    assert all(c.sock is None for c in kept) and not lean._idle


def test_a_ca_bundle_that_does_not_load_sends_the_caller_to_the_full_path(hostile):
    lean = Heads("/nonexistent/ca.pem", (5, 5), 5, "test")
    assert lean.head(f"https://{hostile.host}/v2/a/manifests/v1", {}) is None


def test_only_plain_paths_are_asked(hostile):
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    lean = heads()
    assert lean.head(f"http://{hostile.host}/v2/a/manifests/v1?x=1", {}) is None
    assert lean.head(f"ftp://{hostile.host}/v2/a/manifests/v1", {}) is None
    assert lean.head(f"http://{hostile.host}/v2/a/manifests/v1", {"X-Bad": "a\r\nb: c"}) \
        is None, "a header that would split the request is refused, not sent"
    assert not [r for r in hostile.requests if "X-Bad" in r[2] or "b" in r[2]]


SPOILS = {
    "a folded header line": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\n",
    "the digest twice": b"HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:" + b"b" * 64 +
                        b"\r\n",
    "bytes after the headers": b"HTTP/1.1 200 OK\r\n",
    "an interim status": b"HTTP/1.1 100 Continue\r\n",
    "HTTP/2 spoken": b"HTTP/2 200\r\n",
    "a space before the colon": b"HTTP/1.1 200 OK\r\nX-A : 1\r\n",
    "a control character": b"HTTP/1.1 200 OK\r\nX-A: a\x1b[2Jb\r\n",
    "101 header lines": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i
                                                      for i in range(99)),
    "64 KiB of headers": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (64 << 10) + b"\r\n",
    "cut mid-header": b"HTTP/1.1 200 OK\r\nDocker-Con",
}


def spoiled(spoil: str, h) -> None:
    """Write the answer ``SPOILS[spoil]`` makes of a plain one."""
    if spoil == "cut mid-header":
        h.wfile.write(SPOILS[spoil])
        h.close_connection = True
        return
    h.wfile.write(SPOILS[spoil] + f"Docker-Content-Digest: {DIGEST}\r\nContent-Length: 0"
                  "\r\n\r\n".encode() + (b"surprise" if "after" in spoil else b""))


@pytest.mark.parametrize("spoil", list(SPOILS))
def test_an_answer_that_is_not_strictly_a_head_answer_is_not_taken(hostile, spoil):
    """Read strictly here: anything http.client would take in its stride (a folded line, a
    second digest, a body) or not (HTTP/2, 101 lines) sends the caller to the full path,
    and the connection is not kept."""
    hostile.on("HEAD", "/manifests/", Answer(write=lambda h: spoiled(spoil, h)))
    lean = heads()
    assert lean.head(f"http://{hostile.host}/v2/a/manifests/v1", {}) is None
    assert not any(lean._idle.values()), "a connection that answered so is not kept"


def test_a_plain_answer_is_read_and_its_connection_kept_or_closed_as_it_says(hostile):
    def answer(close: bool):
        def write(h):
            h.wfile.write(b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: a\r\nDate: b\r\n"
                          b"docker-content-digest:\t" + DIGEST.encode() + b" \r\n" +
                          (b"Connection: close\r\n" if close else b"") +
                          b"Content-Length: 1234\r\n\r\n")
            h.close_connection = close
        return write
    for close in (False, True):
        hostile.on("HEAD", "/manifests/", Answer(write=answer(close)))
        lean = heads()
        status, got = lean.head(f"http://{hostile.host}/v2/a/manifests/v1", {"Accept": "x/y"})
        assert status == 200 and got["Docker-Content-Digest"] == DIGEST
        assert got.get("date") == "a", "the first of a header sent twice, but the digest"
        assert bool(any(lean._idle.values())) is not close
    sent = [r for r in hostile.requests if r[0] == "HEAD"][-1]
    assert sent[2].get("Accept") == "x/y" and sent[2].get("User-Agent") == "test"


def test_a_request_that_could_be_split_is_never_sent(hostile):
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    lean = heads()
    for headers, path in (({"Authorization": "Bearer a\nX-Injected: 1"}, "/v2/a/manifests/v1"),
                          ({"Bad Name": "v"}, "/v2/a/manifests/v1"),
                          ({"Authorization": "Bearer \u00e9"}, "/v2/a/manifests/v1"),
                          ({}, "/v2/a/manifests/v1%20x HTTP/1.1\r\nX: y"),
                          ({}, "/v2/a b/manifests/v1"),
                          ({}, "/v2/a\x7fb/manifests/v1"),
                          ({"Host": "elsewhere"}, "/v2/a/manifests/v1")):
        assert lean.head(f"http://{hostile.host}{path}", headers) is None
    host, port = hostile.host.split(":")
    for base in (f"http://{host}\r\n:{port}", f"http://{host}:{port}\t", f"http://\n{host}:{port}"):
        assert lean.head(f"{base}/v2/a/manifests/v1", {}) is None
    assert not [r for r in hostile.requests if r[0] == "HEAD"], "nothing was sent"


def test_bytes_sent_late_on_an_idle_connection_are_never_the_next_answer(hostile):
    """A registry that sends, after an answer, a second one nobody asked for: the next HEAD
    does not take it for its own (its connection is dropped, a fresh one asked)."""
    stray = f"sha256:{'e' * 64}"

    def answer(h):
        h.wfile.write(f"HTTP/1.1 200 OK\r\nDocker-Content-Digest: {DIGEST}\r\n"
                      "Content-Length: 0\r\n\r\n".encode())
        h.wfile.flush()
        time.sleep(0.2)
        h.wfile.write(f"HTTP/1.1 200 OK\r\nDocker-Content-Digest: {stray}\r\n"
                      "Content-Length: 0\r\n\r\n".encode())
    hostile.on("HEAD", "/manifests/", Answer(write=answer))
    lean = heads()
    url = f"http://{hostile.host}/v2/a/manifests/v1"
    assert lean.head(url, {})[1]["Docker-Content-Digest"] == DIGEST
    time.sleep(0.5)                                 # the stray answer is there by now
    assert lean.head(url, {})[1]["Docker-Content-Digest"] == DIGEST


def test_an_answer_dripped_a_byte_at_a_time_is_read_whole():
    """Read a byte per ``recv``, the blank line that ends the head is still found where it
    is, whichever pieces it spans (each piece is searched once, with the three bytes before
    it)."""
    from unpacked.registry.heads import read_answer
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 3_000 + b"\r\nX-B: 1\r\n\r\n"

    class Drip:
        def __init__(self, size: int):
            self.at, self.size = 0, size

        def recv(self, n):
            piece = head[self.at:self.at + self.size]
            self.at += len(piece)
            return piece

    for size in (1, 2, 3, 5, 4096):
        status, got, keep = read_answer(Drip(size))
        assert (status, len(got["X-Pad"]), got["x-b"], keep) == (200, 3_000, "1", True)


def test_the_headers_of_each_request_are_its_own_though_their_checked_form_is_kept(hostile):
    """The header block is checked once per registry and set of headers, and kept: a token
    renewed mid-run is sent from then on, a refused header stays refused, and another
    registry's requests name their own host."""
    hostile.on("HEAD", "/manifests/", Answer(200, {"Docker-Content-Digest": DIGEST}))
    lean = heads()
    url = f"http://{hostile.host}/v2/a/manifests/v1"
    for token in ("one", "two", "one"):
        assert lean.head(url, {"Authorization": f"Bearer {token}"})[0] == 200
    bad = {"Authorization": "Bearer a\r\nX-Injected: 1"}
    assert lean.head(url, bad) is None and lean.head(url, bad) is None
    port = hostile.host.rsplit(":", 1)[1]
    assert lean.head(f"http://localhost:{port}/v2/a/manifests/v1", {})[0] == 200
    sent = [r[2] for r in hostile.requests if r[0] == "HEAD"]
    assert [s.get("Authorization") for s in sent] == \
        ["Bearer one", "Bearer two", "Bearer one", None]
    assert [s.get("Host") for s in sent] == [hostile.host] * 3 + [f"localhost:{port}"]
    assert not [s for s in sent if "X-Injected" in s]


def test_a_header_value_that_is_not_text_is_refused_not_raised(hostile):
    lean = heads()
    url = f"http://{hostile.host}/v2/a/manifests/v1"
    assert lean.head(url, {"Authorization": ["Bearer", "x"]}) is None
    assert lean.head(url, {"X-Count": 3}) is None
    assert not [r for r in hostile.requests if r[0] == "HEAD"], "nothing was sent"
