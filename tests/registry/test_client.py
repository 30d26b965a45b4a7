"""The pull client against a real docker-registry: auth modes, platforms, tags, faults."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from email.utils import formatdate

import pytest
from helpers import FAST, creds_for, push_simple, unique
from helpers.images import Entry, skopeo_copy, tar_bytes

from unpacked import reference
from unpacked.errors import DigestMismatch, NotFound, RegistryError, Unauthorized, Unsupported
from unpacked.registry.auth import find_credential, parse_challenge
from unpacked.registry.retry import RetryPolicy, network_problem, retry_after


def ref(host: str, repo: str, tag: str = "v1"):
    return reference.parse(f"http://{host}/{repo}:{tag}")


def read_blob(client, r, layer) -> bytes:
    stream = client.open_blob(r, layer.digest, layer.size)
    data = stream.read()
    assert stream.verified
    return data


def test_resolve_and_stream_blob(registry, layout, make_client):
    repo = unique()
    img = push_simple(registry, layout, repo, config={"Entrypoint": ["/bin/echo"]})
    client = make_client()
    resolved = client.resolve(ref(registry.host, repo), ("linux/amd64",))
    assert resolved.images[0].manifest_digest == img.manifest_digest
    assert resolved.images[0].config_digest == img.config_digest
    assert [x.digest for x in resolved.images[0].layers] == img.layers
    assert [x.diff_id for x in resolved.images[0].layers] == img.diff_ids
    assert resolved.images[0].config_doc.entrypoint == ("/bin/echo",)
    assert hashlib.sha256(resolved.images[0].manifest).hexdigest() == img.manifest_digest[7:]
    blob = read_blob(client, ref(registry.host, repo), resolved.images[0].layers[0])
    on_disk = (layout.path / "blobs" / "sha256" / img.layers[0][7:]).read_bytes()
    assert blob == on_disk


def test_missing_image_names_image_and_answer(registry, layout, make_client):
    repo = unique()
    push_simple(registry, layout, repo)
    client = make_client()
    with pytest.raises(NotFound) as exc:
        client.resolve(ref(registry.host, repo, "nope"), ("linux/amd64",))
    text = str(exc.value)
    assert f"{registry.host}/{repo}:nope" in text and "MANIFEST_UNKNOWN" in text
    with pytest.raises(NotFound) as exc:
        client.resolve(ref(registry.host, unique("absent")), ("linux/amd64",))
    assert "404" in str(exc.value) and "UNKNOWN" in str(exc.value)


def test_basic_auth(basic_registry, layout, make_client):
    repo = unique()
    img = push_simple(basic_registry, layout, repo)
    r = ref(basic_registry.host, repo)
    good = make_client(creds_for(basic_registry.host))
    assert good.resolve(r, ("linux/amd64",)).images[0].manifest_digest == img.manifest_digest
    assert read_blob(good, r, good.resolve(r, ("linux/amd64",)).images[0].layers[0])
    with pytest.raises(Unauthorized) as exc:
        make_client().resolve(r, ("linux/amd64",))
    assert f"unauthorized for {basic_registry.host}/{repo}" in str(exc.value)
    from unpacked.registry.auth import Credential
    wrong = make_client(lambda host: Credential("tester", "wrong"))
    with pytest.raises(Unauthorized) as exc:
        wrong.resolve(r, ("linux/amd64",))
    assert f"unauthorized for {basic_registry.host}/{repo} as tester" in str(exc.value)


def test_token_auth_and_token_cache(token_registry, layout, make_client):
    repo = unique()
    img = push_simple(token_registry, layout, repo)
    r = ref(token_registry.host, repo)
    issuer = token_registry.issuer
    before = len(issuer.requests)
    client = make_client(creds_for(token_registry.host))
    resolved = client.resolve(r, ("linux/amd64",))
    assert resolved.images[0].manifest_digest == img.manifest_digest
    assert read_blob(client, r, resolved.images[0].layers[0])
    fetched = len(issuer.requests) - before
    assert fetched == 1, "one token serves HEAD, GETs and the blob of one repository"
    assert issuer.requests[-1]["user"] == "tester"
    assert issuer.requests[-1]["scope"] == [f"repository:{repo}:pull"]
    # A new client with the same cache folder reuses the token from disk.
    again = make_client(creds_for(token_registry.host))
    again.resolve(r, ("linux/amd64",))
    assert len(issuer.requests) - before == 1
    tokens = (again.auth.tokens._disk.directory)
    import os
    import stat
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o700


def test_token_auth_refusals(token_registry, layout, make_client):
    repo = unique()
    push_simple(token_registry, layout, repo)
    r = ref(token_registry.host, repo)
    with pytest.raises(Unauthorized) as exc:
        make_client(cache=False).resolve(r, ("linux/amd64",))
    assert f"unauthorized for {token_registry.host}/{repo} anonymously" in str(exc.value)
    from unpacked.registry.auth import Credential
    with pytest.raises(Unauthorized) as exc:
        make_client(lambda h: Credential("tester", "bad"), cache=False).resolve(r, ("linux/amd64",))
    assert "unauthorized for" in str(exc.value) and "401" in str(exc.value)


def test_token_field_access_token_and_short_life(token_registry, layout, make_client):
    repo = unique()
    push_simple(token_registry, layout, repo)
    issuer = token_registry.issuer
    issuer.field, issuer.expires_in = "access_token", 2
    try:
        client = make_client(creds_for(token_registry.host))
        r = ref(token_registry.host, repo)
        client.resolve(r, ("linux/amd64",))
        before = len(issuer.requests)
        time.sleep(2.0)      # past 80 % of the token's life: a new token is fetched
        client.resolve(r, ("linux/amd64",))
        assert len(issuer.requests) == before + 1
    finally:
        issuer.field, issuer.expires_in = "token", 300


def test_multi_arch_index(registry, layout, make_client):
    repo = unique("multi")
    amd = layout.image("amd", [tar_bytes([Entry("arch", b"amd64")])], tagged=False)
    arm = layout.image("arm", [tar_bytes([Entry("arch", b"arm64")])], arch="arm64",
                       variant="v8", tagged=False)
    armv7 = layout.image("arm7", [tar_bytes([Entry("arch", b"armv7")])], arch="arm",
                         variant="v7", tagged=False)
    top = layout.index("multi", [arm, armv7, amd])
    skopeo_copy(layout.path, "multi", f"{registry.host}/{repo}:multi", all_images=True)
    client = make_client()
    r = ref(registry.host, repo, "multi")
    got = client.resolve(r, ("linux/amd64",))
    assert got.top_digest == top and got.images[0].manifest_digest == amd.manifest_digest
    assert client.resolve(r, ("linux/arm64",)).images[0].manifest_digest == arm.manifest_digest
    assert client.resolve(r, ("linux/arm64/v8",)).images[0].manifest_digest == arm.manifest_digest
    assert client.resolve(r, ("linux/arm/v7",)).images[0].manifest_digest == armv7.manifest_digest
    with pytest.raises(NotFound) as exc:
        client.resolve(r, ("linux/s390x",))
    assert "linux/s390x" in str(exc.value) and "linux/arm64/v8" in str(exc.value)
    assert "unknown" not in str(exc.value)


def test_digest_reference(registry, layout, make_client):
    repo = unique()
    img = push_simple(registry, layout, repo)
    r = reference.parse(f"http://{registry.host}/{repo}@{img.manifest_digest}")
    assert make_client().resolve(r, ("linux/amd64",)).images[0].config_digest == img.config_digest
    r2 = reference.parse(f"http://{registry.host}/{repo}:v1@{img.manifest_digest}")
    assert make_client().resolve(r2, ("linux/amd64",)).images[0].config_digest == img.config_digest


def test_tag_listing_follows_link_pages(registry, layout, make_client, proxy):
    repo = unique("tags")
    push_simple(registry, layout, repo, "t000")
    registry.retag(repo, "t000", [f"t{i:03d}" for i in range(1, 250)])
    r = reference.parse(f"http://{proxy.host}/{repo}:t000")
    proxy.paginate = True        # distribution 2.8 ignores n; the proxy pages as the spec says
    tags, bad = make_client().tags(r, page=100)
    assert sorted(tags) == [f"t{i:03d}" for i in range(250)] and bad == []
    assert proxy.count("GET", "/tags/list") == 3


def test_reresolving_unchanged_costs_one_head(registry, layout, make_client, proxy):
    repos = [unique() for _ in range(3)]
    for repo in repos:
        push_simple(registry, layout, repo)
    client = make_client()
    refs = [reference.parse(f"http://{proxy.host}/{repo}:v1") for repo in repos]
    known = [client.resolve(r, ("linux/amd64",)) for r in refs]
    proxy.clear()
    again = [client.resolve(r, ("linux/amd64",), k) for r, k in zip(refs, known, strict=True)]
    assert again == known
    assert proxy.count("HEAD") == 3
    assert proxy.count("GET") == 0


def test_moved_tag_is_noticed(registry, layout, make_client):
    repo = unique()
    push_simple(registry, layout, repo, files={"a": b"1"})
    client = make_client()
    r = ref(registry.host, repo)
    first = client.resolve(r, ("linux/amd64",))
    push_simple(registry, layout, repo, files={"a": b"2"})
    second = client.resolve(r, ("linux/amd64",), first)
    assert second.images[0].manifest_digest != first.images[0].manifest_digest


# -- faults through the proxy ---------------------------------------------------------------

@pytest.fixture
def big_image(registry, layout):
    repo = unique("big")
    payload = bytes(range(256)) * 4096 * 2      # 2 MiB, compresses poorly enough to matter
    import os
    payload += os.urandom(1 << 20)
    img = push_simple(registry, layout, repo, files={"big.bin": payload})
    return repo, img


def fetch_via(proxy, client, repo, img):
    r = reference.parse(f"http://{proxy.host}/{repo}:v1")
    resolved = client.resolve(r, ("linux/amd64",))
    return read_blob(client, r, resolved.images[0].layers[0]), resolved


def test_connection_reset_mid_blob_resumes(proxy, big_image, make_client, layout):
    repo, img = big_image
    proxy.add("/blobs/" + img.layers[0], "reset", at=300_000)
    data, _ = fetch_via(proxy, make_client(), repo, img)
    assert hashlib.sha256(data).hexdigest() == img.layers[0][7:]
    assert proxy.count("GET", "/blobs/" + img.layers[0]) == 2


def test_500_then_success(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/manifests/", "status", status=500, method="HEAD")
    proxy.add("/blobs/" + img.layers[0], "status", status=503)
    data, _ = fetch_via(proxy, make_client(), repo, img)
    assert hashlib.sha256(data).hexdigest() == img.layers[0][7:]


def test_429_honours_retry_after(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/manifests/", "status", status=429, method="HEAD",
              headers={"Retry-After": "1"})
    start = time.monotonic()
    fetch_via(proxy, make_client(), repo, img)
    assert time.monotonic() - start >= 0.9


def test_429_beyond_budget_fails_clearly(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/manifests/", "status", status=429, method="HEAD", times=99,
              headers={"Retry-After": str(int(time.time()) + 3600)})
    proxy.add("/manifests/", "status", status=429, method="GET", times=99)
    with pytest.raises(RegistryError) as exc:
        fetch_via(proxy, make_client(), repo, img)
    assert "429" in str(exc.value)


def test_flipped_byte_is_refused_naming_blob(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/blobs/" + img.layers[0], "flip", at=1000)
    with pytest.raises(DigestMismatch) as exc:
        fetch_via(proxy, make_client(), repo, img)
    assert img.layers[0] in str(exc.value)


def test_flipped_manifest_is_refused(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/manifests/sha256:", "flip", at=20)
    with pytest.raises((DigestMismatch, RegistryError)) as exc:
        fetch_via(proxy, make_client(), repo, img)
    assert "manifest" in str(exc.value)


def test_truncated_body_resumes_or_fails(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/blobs/" + img.layers[0], "truncate", at=100_000)
    data, _ = fetch_via(proxy, make_client(), repo, img)
    assert hashlib.sha256(data).hexdigest() == img.layers[0][7:]
    proxy.add("/blobs/" + img.layers[0], "truncate", at=100_000, times=99)
    with pytest.raises(RegistryError) as exc:
        fetch_via(proxy, make_client(), repo, img)
    assert img.layers[0] in str(exc.value)


def test_no_retry_on_plain_4xx(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/blobs/" + img.layers[0], "status", status=403, times=5)
    with pytest.raises(RegistryError) as exc:
        fetch_via(proxy, make_client(), repo, img)
    assert "403" in str(exc.value) and "INJECTED" in str(exc.value)
    assert proxy.count("GET", "/blobs/" + img.layers[0]) == 1


def test_connection_refused_is_retried_then_reported(make_client):
    from helpers.registry import free_port
    r = reference.parse(f"http://127.0.0.1:{free_port()}/x/y:1")
    client = make_client(policy=RetryPolicy(attempts=2, seconds=5, base=0.01, cap=0.01))
    with pytest.raises(RegistryError) as exc:
        client.resolve(r, ("linux/amd64",))
    assert "cannot reach 127.0.0.1" in str(exc.value)


def test_schema1_is_unsupported(proxy, big_image, make_client):
    repo, _ = big_image
    body = json.dumps({"schemaVersion": 1, "name": repo, "tag": "v1", "fsLayers": [],
                       "history": []}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    kind = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    proxy.add("/manifests/v1", "body", status=200, method="HEAD",
              headers={"Docker-Content-Digest": digest, "Content-Type": kind})
    proxy.add("/manifests/" + digest, "body", status=200, data=body,
              headers={"Docker-Content-Digest": digest, "Content-Type": kind})
    with pytest.raises(Unsupported) as exc:
        fetch_via(proxy, make_client(), repo, None)
    assert "schema 1" in str(exc.value) and repo in str(exc.value)


# -- pure parts -------------------------------------------------------------------------------

def test_parse_challenge_quoted_commas():
    got = parse_challenge('Bearer realm="https://a/token",service="reg",'
                          'scope="repository:x/y:pull,push",error="invalid_token"')
    assert got == [("bearer", {"realm": "https://a/token", "service": "reg",
                               "scope": "repository:x/y:pull,push", "error": "invalid_token"})]
    assert parse_challenge('Basic realm="Registry Realm"') == [("basic",
                                                                 {"realm": "Registry Realm"})]


def test_retry_after_forms():
    now = 1_700_000_000.0
    assert retry_after("7", now) == 7
    assert retry_after(str(int(now) + 30), now) == 30
    assert abs(retry_after(formatdate(now + 12, usegmt=True), now) - 12) < 1
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


def test_credentials_from_config_files(tmp_path):
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(b"alice:pw1").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": auth},
        "http://reg.example:5000": {"username": "bob", "password": "pw2"}}}))
    env = {"DOCKER_CONFIG": str(docker), "HOME": str(tmp_path)}
    assert find_credential("registry-1.docker.io", env).username == "alice"
    assert find_credential("reg.example:5000", env).password == "pw2"
    assert find_credential("other.example", env) is None
    podman = tmp_path / "auth.json"
    podman.write_text(json.dumps({"auths": {"reg.example:5000": {"username": "carol",
                                                                   "password": "pw3"}}}))
    env["REGISTRY_AUTH_FILE"] = str(podman)
    assert find_credential("reg.example:5000", env).username == "carol"


def test_fast_policy_is_bounded():
    assert FAST.attempts >= 2


def test_resume_restarts_when_the_server_ignores_range(proxy, big_image, make_client):
    repo, img = big_image
    proxy.add("/blobs/" + img.layers[0], "reset", at=200_000)
    proxy.add("/blobs/" + img.layers[0], "ignore-range")
    data, _ = fetch_via(proxy, make_client(), repo, img)
    assert hashlib.sha256(data).hexdigest() == img.layers[0][7:]
    ranged = [hdrs for m, p, hdrs, _ in proxy.received if "/blobs/" + img.layers[0] in p]
    assert len(ranged) == 2 and "Range" in ranged[1], "the resume asked for a range"


def test_redirect_to_another_host_drops_authorization(token_registry, registry, layout,
                                                      make_client):
    """Blobs served from a CDN: follow the redirect, never send our token to another host."""
    from helpers.faults import FaultProxy
    repo = unique()
    img = push_simple(token_registry, layout, repo, files={"f": os.urandom(50_000)})
    skopeo_copy(layout.path, "v1", f"{registry.host}/{repo}:v1")     # the "CDN" has it too
    front, cdn = FaultProxy(token_registry.host), FaultProxy(registry.host)
    try:
        other = f"http://localhost:{cdn.server.server_port}"          # another host name
        front.add("/blobs/" + img.layers[0], "redirect", data=other.encode())
        client = make_client(creds_for(front.host))
        r = reference.parse(f"http://{front.host}/{repo}:v1")
        resolved = client.resolve(r, ("linux/amd64",))
        data = read_blob(client, r, resolved.images[0].layers[0])
        assert hashlib.sha256(data).hexdigest() == img.layers[0][7:]
        sent = [hdrs for m, p, hdrs, _ in cdn.received if "/blobs/" in p]
        assert len(sent) == 1 and "Authorization" not in sent[0]
        assert any("Authorization" in h for m, p, h, _ in front.received)
    finally:
        front.stop()
        cdn.stop()


def test_a_failed_connection_reads_the_same_each_run():
    """urllib3 opens its message with the connection's repr, an object's address in
    versions requests allows (not 2.7's own connections): kept, each run would store a new
    reason, and a run would take the changed state for a change and plan twice."""
    from urllib3.exceptions import NewConnectionError

    reasons = set()
    for _ in range(2):
        exc = NewConnectionError(object(), "Failed to establish a new connection: "
                                           "[Errno 113] No route to host")
        assert " object at 0x" in str(exc)
        reasons.add(network_problem(exc, "registry.example"))
    assert reasons == {("cannot reach registry.example: Failed to establish a new "
                        "connection: [Errno 113] No route to host", True)}
