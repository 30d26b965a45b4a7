"""The lean HEAD path of a re-resolve, against a real HTTP server that misbehaves: it keeps
its connections few, survives a registry that drops idle ones, and never raises."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
