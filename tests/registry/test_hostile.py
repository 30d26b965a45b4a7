"""The client against a hostile registry: every interaction is bounded, credentials never
leave the registry they belong to, and what a registry says is sanitised."""

from __future__ import annotations

import os
import time

import pytest
from helpers import FAST, unique
from helpers.hostile import Answer, HostileRegistry, dribble, dumps, endless, sha, valid_image

from unpacked import reference
from unpacked.errors import BadDocument, DigestMismatch, RegistryError, Unreachable
from unpacked.registry.auth import Credential, only_for
from unpacked.registry.client import MAX_TAG_PAGES, RegistryClient

AMD64 = ("linux/amd64",)


def client(**kw) -> RegistryClient:
    return RegistryClient(None, policy=FAST, timeout=5, **kw)


def ref(host: str, repo: str = "evil/img", tag: str = "v1"):
    return reference.parse(f"http://{host}/{repo}:{tag}")


def test_endless_tag_pages_are_capped(hostile):
    def page(h):                    # every page links to one more
        n = int(h.path.rpartition("page=")[2]) if "page=" in h.path else 0
        body = dumps({"tags": [f"t{n}"]})
        h.send_response(200)
        h.send_header("Link", f'</v2/evil/img/tags/list?page={n + 1}>; rel="next"')
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    hostile.on("GET", "/tags/list", Answer(write=page))
    with pytest.raises(RegistryError, match=f"more than {MAX_TAG_PAGES} pages"):
        client().tags(ref(hostile.host))


def test_tag_pages_never_leave_the_registry(hostile):
    hostile.on("GET", "/tags/list", Answer(200, {"Link": '<http://203.0.113.9/x>; rel="next"'},
                                           dumps({"tags": ["a"]})))
    with pytest.raises(RegistryError, match="another host"):
        client().tags(ref(hostile.host))


def test_a_dribbling_manifest_meets_its_deadline(hostile):
    manifest, _ = valid_image(b"x" * 512, sha(b"x" * 512))
    hostile.on("GET", "/manifests/v1", Answer(write=dribble(dumps(manifest), 0.2)))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="not received within 1.5s"):
        RegistryClient(None, policy=FAST, timeout=5, deadline=1.5).resolve(ref(hostile.host),
                                                                          AMD64)
    assert time.monotonic() - started < 10


def test_an_announced_oversized_manifest_is_not_read(hostile):
    hostile.on("HEAD", "/manifests/v1", Answer(404))
    hostile.on("GET", "/manifests/v1", Answer(200, {"Content-Length": str(1 << 30)}, b"{}"))
    with pytest.raises(BadDocument, match="announced"):
        client().get_manifest(ref(hostile.host), "v1")


def test_an_endless_blob_stops_at_its_declared_size(hostile):
    layer = b"\0" * 1000
    hostile.on("GET", f"/blobs/{sha(layer)}", Answer(write=endless(1000)))
    stream = client().open_blob(ref(hostile.host), sha(layer), 1000)
    with pytest.raises(DigestMismatch, match="more than the 1,000 bytes announced"):
        while stream.read(65536):
            pass


def test_registry_text_is_sanitised(hostile):
    evil = "\x1b[31mred\x1b[0m\nunpacked: 99 added, 0 failed\r\x07"
    hostile.on("*", "/manifests/", Answer(404, {"Content-Type": "application/json"},
                                          dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                                             "message": evil}]})))
    with pytest.raises(RegistryError) as exc:
        client().resolve(ref(hostile.host), AMD64)
    text = str(exc.value)
    assert "MANIFEST_UNKNOWN" in text and "red" in text
    assert not any(c in text for c in "\x1b\n\r\x07"), repr(text)


def test_push_credentials_never_follow_an_upload_elsewhere(hostile):
    other = HostileRegistry()
    try:
        def registry(h):       # Basic auth first, then an upload sent to the other host
            if "Authorization" not in h.headers:
                status, headers = 401, {"WWW-Authenticate": 'Basic realm="r"'}
            elif h.command == "HEAD":
                status, headers = 404, {}
            else:
                status = 202
                headers = {"Location": f"http://{other.host}/v2/thin/x/blobs/uploads/u1"}
            h.send_response(status)
            for k, v in {**headers, "Content-Length": "0"}.items():
                h.send_header(k, v)
            h.end_headers()
        hostile.on("*", "/", Answer(write=registry))
        other.on("*", "/", Answer(401, {"WWW-Authenticate": 'Basic realm="steal"'}))
        secret = Credential("pusher", "s3cret")
        c = client(credentials=only_for(hostile.host, secret))
        with pytest.raises(RegistryError):
            c.push_blob(ref(hostile.host, "thin/x"), b"data", sha(b"data"))
        assert any("Authorization" in h for _, _, h in hostile.requests), "the registry got it"
        assert other.requests, "the upload went to the other host"
        assert not any("Authorization" in h for _, _, h in other.requests), \
            "credentials were sent to a host the registry pointed at"
    finally:
        other.stop()


def test_unresolvable_names_fail_at_once_without_retries():
    started = time.monotonic()
    with pytest.raises(Unreachable) as exc:
        client().resolve(ref("no-such-registry.invalid"), AMD64)
    assert "cannot reach no-such-registry.invalid: name does not resolve" in str(exc.value)
    assert time.monotonic() - started < 5


def test_tls_to_a_plain_http_registry_says_what_to_do(hostile):
    with pytest.raises(Unreachable) as exc:
        client().resolve(reference.parse(f"https://{hostile.host}/evil/img:v1"), AMD64)
    assert f"use http://{hostile.host}/" in str(exc.value)
    assert len(hostile.requests) == 0 or all(m != "GET" for m, _, _ in hostile.requests)


def test_an_index_that_lies_about_platforms_fails_its_image(hostile):
    layer = b"x" * 512
    manifest, config = valid_image(layer, sha(layer))
    amd = hostile.image("evil/multi", "amd", manifest, config, {sha(layer): layer})
    body = dumps(manifest)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [
                 {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd,
                  "size": len(body), "platform": {"os": "linux", "architecture": arch}}
                 for arch in ("amd64", "arm64")]}
    served = Answer(200, {"Content-Type": "application/vnd.oci.image.index.v1+json",
                          "Docker-Content-Digest": sha(dumps(index))}, dumps(index))
    hostile.on("*", r"/evil/multi/manifests/v1$", served)
    hostile.on("*", "/evil/multi/manifests/" + sha(dumps(index)) + "$", served)
    c = client()
    with pytest.raises(BadDocument, match="is for linux/arm64, but its config says linux/amd64"):
        c.resolve(ref(hostile.host, "evil/multi"), ("linux/amd64", "linux/arm64"))
    got = c.resolve(ref(hostile.host, "evil/multi"), ("linux/amd64",))
    assert [i.platform for i in got.images] == ["linux/amd64"]


def test_a_flood_behind_a_401_is_not_read(hostile):
    def flood(h):
        h.send_response(401)
        h.send_header("WWW-Authenticate", f'Bearer realm="http://{hostile.host}/token"')
        h.send_header("Content-Length", str(1 << 40))
        h.end_headers()
        chunk = b"x" * 65536
        for _ in range(1 << 20):
            h.wfile.write(chunk)
    hostile.on("*", "/manifests/", Answer(write=flood))
    hostile.on("GET", "/token", Answer(200, {}, dumps({"token": "t", "expires_in": 60})))
    started = time.monotonic()
    with pytest.raises(RegistryError):
        client().resolve(ref(hostile.host), AMD64)
    assert time.monotonic() - started < 30


def test_headers_sent_a_byte_at_a_time_meet_the_deadline(hostile):
    def trickle(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 10_000:      # one header that never ends
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.2)
    hostile.on("*", "/manifests/", Answer(write=trickle))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="no answer within 1.5s"):
        RegistryClient(None, policy=FAST, timeout=5, deadline=1.5).resolve(ref(hostile.host),
                                                                          AMD64)
    assert time.monotonic() - started < 20


def test_a_slow_blob_meets_its_deadline(hostile, monkeypatch):
    from unpacked.registry import client as client_module
    monkeypatch.setattr(client_module, "BLOB_GRACE", 1.0)
    blob = b"\0" * (1 << 20)

    def slow(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(blob)))
        h.end_headers()
        for i in range(0, len(blob), 100):
            h.wfile.write(blob[i:i + 100])
            h.wfile.flush()
            time.sleep(1)
    hostile.on("GET", "/blobs/", Answer(write=slow))
    started = time.monotonic()
    stream = client().open_blob(ref(hostile.host), sha(blob), len(blob))
    with pytest.raises(RegistryError, match="slower than"):
        while stream.read(65536):
            pass
    assert time.monotonic() - started < 40


def test_a_redirect_never_borrows_another_registrys_credentials(hostile, basic_registry,
                                                                layout):
    from helpers import creds_for, push_simple
    secret = unique("secret")
    push_simple(basic_registry, layout, secret, files={"SECRET.txt": b"private"})
    hostile.on("*", "/v2/evil/", Answer(write=lambda h: redirect(h, basic_registry.host,
                                                                 secret)))
    c = client(credentials=creds_for(basic_registry.host))
    c.resolve(ref(basic_registry.host, secret), AMD64)        # B is trusted, as in a recipe
    with pytest.raises(RegistryError) as exc:
        c.resolve(ref(hostile.host, "evil/img"), AMD64)
    assert "401" in str(exc.value) or "unauthorized" in str(exc.value)


def redirect(h, host: str, repo: str) -> None:
    rest = h.path.split("/v2/evil/img/", 1)[1]
    h.send_response(307)
    h.send_header("Location", f"http://{host}/v2/{repo}/{rest}")
    h.send_header("Content-Length", "0")
    h.end_headers()


def test_a_worker_forked_while_the_watchdog_held_its_lock_still_meets_deadlines(hostile):
    """A worker may be forked at any moment (the run's, or doit's own with -P process); the
    child must not inherit a held lock."""
    from unpacked.registry import retry

    def trickle(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 10_000:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.2)
    hostile.on("*", "/manifests/", Answer(write=trickle))
    with retry._WATCHDOG.lock, retry._IN_FLIGHT_LOCK:
        pid = os.fork()
        if pid == 0:                        # the child: one request against the dribbler
            code = 1
            try:
                RegistryClient(None, policy=FAST, timeout=5, deadline=1.5).resolve(
                    ref(hostile.host), AMD64)
            except RegistryError:
                code = 0
            finally:
                os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on a lock its parent held")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("spoil", ["too many headers", "a header line of 100 KB",
                                   "a status line that is not HTTP"])
def test_a_hostile_head_answer_is_refused_and_asked_again(hostile, spoil):
    """The HEAD of a re-resolve rides a lean connection of its own: an answer that breaks
    HTTP there is not taken (nor does it hang or crash); the full path asks again and
    says what the registry did."""
    def answer(h):
        if spoil == "a status line that is not HTTP":
            h.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            return
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        h.wfile.write(f"Docker-Content-Digest: sha256:{'a' * 64}\r\n".encode())
        if spoil == "too many headers":
            h.wfile.write(b"".join(b"X-H%d: v\r\n" % i for i in range(500)))
        else:
            h.wfile.write(b"X-Long: " + b"a" * 100_000 + b"\r\n")
        h.wfile.write(b"Content-Length: 0\r\n\r\n")
    hostile.on("HEAD", "/manifests/", Answer(write=answer))
    c = client()
    with pytest.raises(RegistryError) as caught:
        c.head_manifest(ref(hostile.host), "v1")
    assert str(caught.value).startswith(f"manifest {hostile.host}/evil/img:v1: cannot reach")
    heads = [r for r in hostile.requests if r[0] == "HEAD"]
    assert len(heads) >= 2, "asked again on the full path"
