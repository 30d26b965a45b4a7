"""``unpacked listen`` with a real ``docker-registry`` sending its notifications to it: a push
reaches the repository without any cron run, bursts are coalesced, a crash loses nothing, and
the HTTP side refuses what it must."""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import need, unique
from helpers.images import Entry, Layout, skopeo_copy, tar_bytes
from helpers.registry import Registry, free_port
from helpers.site import Site

SECRET = "listen-s3cret"


class Listener:
    def __init__(self, site: Site, debounce: float = 0.5):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.site = site
        self.debounce = debounce
        self.start()

    def start(self) -> None:
        env = dict(self.site.env, UNPACKED_LISTEN_SECRET=SECRET,
                   UNPACKED_LISTEN_DEBOUNCE=str(self.debounce), UNPACKED_VERBOSITY="1")
        self.log = open(self.site.base / "listen.log", "a")  # noqa: SIM115 - lives with it
        self.proc = subprocess.Popen([sys.executable, "-m", "unpacked", "listen", "--bind",
                                      f"127.0.0.1:{self.port}", "--project",
                                      str(self.site.base)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.site.base)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError((self.site.base / "listen.log").read_text())

    def post(self, body: bytes, secret: str | None = SECRET) -> int:
        headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        request = urllib.request.Request(f"{self.url}/events", data=body, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def setup(tmp_path):
    need("docker-registry", "skopeo")
    site = Site(tmp_path / "site")
    site.env["UNPACKED_RETRY_ATTEMPTS"] = "2"
    listener = Listener(site)
    registry = Registry(tmp_path / "registry", notify=(f"{listener.url}/events",
                                                        f"Bearer {SECRET}"))
    yield site, listener, registry
    listener.stop()
    registry.stop()
    site.close()


def wait_for(predicate, seconds: float = 60) -> float:
    started = time.time()
    while time.time() - started < seconds:
        if predicate():
            return time.time() - started
        time.sleep(0.05)
    raise AssertionError("timed out")


def push(registry, layout: Layout, repo: str, tag: str, content: bytes) -> None:
    layout.image(tag, [tar_bytes([Entry("content", content)])])
    skopeo_copy(layout.path, tag, f"{registry.host}/{repo}:{tag}")


def idle(listener) -> bool:
    """Every conversion the listener started has ended (its status is written)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"{listener.url}/metrics", timeout=5).read().decode()
    metrics = {m.name: m.samples[0].value for m in text_string_to_metric_families(text)
               if m.name in ("unpacked_listen_runs", "unpacked_listen_queue_length")}
    return metrics["unpacked_listen_queue_length"] == 0 and \
        metrics["unpacked_listen_runs"] == runs(listener.site)


def runs(site) -> int:
    try:
        return json.loads((site.cache / "status.json").read_text())["totals"]["runs"]
    except (OSError, KeyError, ValueError):
        return 0


def test_a_push_reaches_the_repository_without_cron(setup, tmp_path):
    site, listener, registry = setup
    layout = Layout(tmp_path / "layout")
    app = unique("listen")
    site.recipe([f"http://{registry.host}/{app}:*"])
    public = site.repo_root / registry.host
    seconds = []
    for i in range(5):
        started = time.time()
        push(registry, layout, app, f"v{i}", f"version {i}".encode())
        wait_for(lambda i=i: (public / f"{app}:v{i}" / "content").exists())
        seconds.append(time.time() - started)
    print(f"push to published: median {statistics.median(seconds):.2f}s of {seconds}")
    push(registry, layout, app, "v0", b"moved")
    wait_for(lambda: (public / f"{app}:v0" / "content").read_bytes() == b"moved")
    wait_for(lambda: idle(listener))
    before = runs(site)
    other = unique("unwanted")
    push(registry, layout, other, "v1", b"not wanted")
    time.sleep(3 * listener.debounce + 1)
    assert not (public / f"{other}:v1").exists() and runs(site) == before


def test_a_burst_of_pushes_is_one_or_a_few_runs(setup, tmp_path):
    site, listener, registry = setup
    layout = Layout(tmp_path / "layout")
    app = unique("burst")
    site.recipe([f"http://{registry.host}/{app}:*"])
    push(registry, layout, app, "t0", b"burst")
    wait_for(lambda: (site.repo_root / registry.host / f"{app}:t0").exists())
    wait_for(lambda: idle(listener))
    before = runs(site)
    registry.retag(app, "t0", [f"t{i}" for i in range(1, 51)])
    wait_for(lambda: all((site.repo_root / registry.host / f"{app}:t{i}").is_symlink()
                         for i in range(1, 51)), seconds=120)
    wait_for(lambda: idle(listener))
    assert 1 <= runs(site) - before <= 3, runs(site) - before


def test_nothing_is_lost_when_the_listener_is_killed(setup, tmp_path):
    site, listener, registry = setup
    layout = Layout(tmp_path / "layout")
    app = unique("killed")
    site.recipe([f"http://{registry.host}/{app}:*"])
    listener.stop()
    listener.debounce = 600                      # accepts and queues, converts only later
    listener.start()
    push(registry, layout, app, "v1", b"survives")
    pending = site.cache / "listen" / "pending"
    wait_for(lambda: any(pending.glob("*.json")))
    listener.stop(signal.SIGKILL)
    listener.debounce = 0.5
    listener.start()
    wait_for(lambda: (site.repo_root / registry.host / f"{app}:v1" / "content").exists())
    wait_for(lambda: idle(listener))
    assert not list(pending.glob("*.json"))


def test_what_the_http_side_refuses(setup):
    site, listener, _ = setup
    site.recipe(["http://127.0.0.1:1/some/image:*"])
    event = {"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "some/image",
        "tag": "v1"}, "request": {"host": "127.0.0.1:1"}}]}
    pending = site.cache / "listen" / "pending"
    assert listener.post(json.dumps(event).encode(), secret=None) == 401
    assert listener.post(json.dumps(event).encode(), secret="wrong") == 401
    assert not list(pending.glob("*.json")), "nothing queued without the secret"
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
    conn.putrequest("POST", "/events")                  # announced, never sent: not read
    conn.putheader("Authorization", f"Bearer {SECRET}")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert listener.post(b"{not json") == 400
    assert listener.post(b'{"kind": "something else"}') == 400
    harbor = {"type": "PUSH_ARTIFACT", "event_data": {"resources": [
        {"resource_url": "127.0.0.1:1/some/image:v2"}]}}
    listener.stop()
    listener.debounce = 600
    listener.start()
    assert listener.post(json.dumps(harbor).encode()) == 202
    assert listener.post(json.dumps(event).encode()) == 202
    queued = sorted(json.loads(p.read_text())["name"] for p in pending.glob("*.json"))
    assert queued == ["127.0.0.1:1/some/image:v1", "127.0.0.1:1/some/image:v2"]
    assert listener.post(json.dumps(event).encode()) == 202
    assert len(list(pending.glob("*.json"))) == 2, "a repeated push rewrites its one file"
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"{listener.url}/metrics", timeout=5).read().decode()
    metrics = {m.name: m for m in text_string_to_metric_families(text)}
    assert metrics["unpacked_listen_queue_length"].samples[0].value == 2
    codes = [listener.post(b"{}", secret="guess") for _ in range(60)]
    assert 429 in codes, "refused requests per second per source are bounded"
    assert listener.post(json.dumps(event).encode()) == 202, \
        "who knows the secret is not slowed by who does not"
    log = (site.base / "listen.log").read_text()
    assert log.count("wrong or missing secret") <= 2, "refusals are not logged one by one"
    unwanted = event_for("127.0.0.1:1/other/image:v1")
    codes = [listener.post(unwanted) for _ in range(400)]
    assert codes.count(202) >= 200 and 429 in codes, "even the secret's holder is bounded"
    log = (site.base / "listen.log").read_text()
    assert log.count("notifications a second") == 1, "logged once a minute, on their own"
    text = urllib.request.urlopen(f"{listener.url}/metrics", timeout=5).read().decode()
    outcomes = {s.labels["outcome"]: s.value for m in text_string_to_metric_families(text)
                if m.name == "unpacked_listen_requests" for s in m.samples}
    assert outcomes["limited"] == codes.count(429) and outcomes["refused"] >= 60


def test_refuses_to_start_without_a_secret(tmp_path):
    site = Site(tmp_path / "site")
    env = {k: v for k, v in site.env.items() if not k.startswith("UNPACKED_LISTEN")}
    done = subprocess.run([sys.executable, "-m", "unpacked", "listen", "--bind",
                           f"127.0.0.1:{free_port()}", "--project", str(site.base)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and "no shared secret" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.path.isdir(site.base)


def event_for(*names: str, media="application/vnd.oci.image.manifest.v1+json") -> bytes:
    events = []
    for name in names:
        host, rest = name.split("/", 1)
        repo, _, tag = rest.partition(":")
        events.append({"action": "push", "target": {"mediaType": media, "repository": repo,
                                                    "tag": tag}, "request": {"host": host}})
    return json.dumps({"events": events}).encode()


def pending_names(site) -> list[str]:
    return sorted(json.loads(p.read_text())["name"]
                  for p in (site.cache / "listen" / "pending").glob("*.json"))


def test_events_are_checked_one_by_one(setup):
    site, listener, _ = setup
    site.recipe(["http://127.0.0.1:1/some/image:*"])
    listener.stop()
    listener.debounce = 600
    listener.start()
    digest = "sha256:" + "a" * 64
    body = json.loads(event_for("127.0.0.1:1/some/image:v1"))
    body["events"] += [{"action": "push", "target": "not an object"},
                       json.loads(event_for(f"127.0.0.1:1/some/image:v2@{digest}"))["events"][0]]
    assert listener.post(json.dumps(body).encode()) == 202, "one bad event is skipped alone"
    harbor = {"type": "PUSH_ARTIFACT", "event_data": {"resources": [
        {"resource_url": "127.0.0.1:1/some/image"},                   # no tag: not a push
        {"resource_url": f"127.0.0.1:1/some/image:v3@{digest}"},
        {"digest": digest}]}}
    assert listener.post(json.dumps(harbor).encode()) == 202
    cloud = {"specversion": "1.0", "type": "harbor.artifact.pushed", "id": "1", "source": "h",
             "data": {"resources": [{"resource_url": "127.0.0.1:1/some/image:v4"}]}}
    assert listener.post(json.dumps(cloud).encode()) == 202
    assert pending_names(site) == ["127.0.0.1:1/some/image:v1", "127.0.0.1:1/some/image:v4"]
    log = (site.base / "listen.log").read_text()
    assert "not a push by tag" in log and "without target" in log


def test_a_name_no_recipe_wants_any_more_does_not_block_the_others(setup, tmp_path):
    site, listener, registry = setup
    layout = Layout(tmp_path / "layout")
    keep, drop = unique("keep"), unique("drop")
    site.recipe([f"http://{registry.host}/{keep}:*", f"http://{registry.host}/{drop}:*"])
    listener.stop()
    listener.debounce = 600
    listener.start()
    push(registry, layout, keep, "v1", b"kept")
    push(registry, layout, drop, "v1", b"dropped")
    wait_for(lambda: len(pending_names(site)) == 2)
    listener.stop()
    site.recipe([f"http://{registry.host}/{keep}:*"])
    pending = site.cache / "listen" / "pending"
    for i, junk in enumerate(("5", "null", '{"name": 1}', '["--adhoc", "x"]', "{not json")):
        (pending / f"junk{i}.json").write_text(junk)
    (pending / ".half-written.json").write_text("{")
    listener.debounce = 0.5
    listener.start()
    wait_for(lambda: (site.repo_root / registry.host / f"{keep}:v1" / "content").exists())
    wait_for(lambda: idle(listener))
    assert pending_names(site) == []
    assert not (site.repo_root / registry.host / f"{drop}:v1").exists()
    assert sorted(p.name for p in (site.cache / "listen" / "bad").iterdir()) == \
        [f"junk{i}.json" for i in range(5)]
    assert not (pending / ".half-written.json").exists()
    assert urllib.request.urlopen(f"{listener.url}/healthz", timeout=5).status == 200
    log = (site.base / "listen.log").read_text()
    assert "no recipe wants" in log and "converted 1 image(s)" in log, log


def test_idle_connections_cannot_starve_the_registry(setup):
    import socket
    site, listener, _ = setup
    held = []
    for _ in range(40):         # from another loopback address: a neighbour, not the registry
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", listener.port))
        s.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    started = time.time()
    assert urllib.request.urlopen(f"{listener.url}/healthz", timeout=5).status == 200
    assert time.time() - started < 3
    for s in held:
        s.settimeout(15)
    refused = sum(1 for s in held[16:] if s.recv(1) == b"")
    assert refused == 24, "beyond 16 connections from one source, closed at once"
    started = time.time()
    assert all(s.recv(1024) == b"" for s in held[:16]), "idle connections are closed"
    assert time.time() - started < 15
    for s in held:
        s.close()


def test_a_stop_waits_for_the_running_conversion(registry, proxy, tmp_path):
    """SIGTERM while a conversion runs: the listener forwards it and waits; the conversion
    aborts its transaction; the image stays pending and is converted after a restart."""
    need("docker-registry", "skopeo")
    from helpers.pipeline import push as push_image
    from helpers.pipeline import temps
    site = Site(tmp_path / "site")
    layout = Layout(tmp_path / "layout")
    app = unique("stop")
    img = push_image(registry, layout, app, "v1", [Entry("big", os.urandom(2 << 20))])
    proxy.add(f"/blobs/{img.layers[1]}", "slow", at=65536, delay=0.1)
    site.recipe([f"http://{proxy.host}/{app}:*"])
    listener = Listener(site, debounce=0.1)
    try:
        assert listener.post(event_for(f"{proxy.host}/{app}:v1")) == 202
        wait_for(lambda: temps(site))
        children = subprocess.run(["pgrep", "-f", f"unpacked convert.*{app}"],
                                  capture_output=True, text=True).stdout.split()
        assert children, "the conversion runs"
        listener.stop()
        assert listener.proc.returncode == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in children), \
            "the listener ended after its conversion"
        assert not site.transaction_open()
        assert pending_names(site) == [f"{proxy.host}/{app}:v1"]
        log = (site.base / "listen.log").read_text()
        assert "waiting for the running conversion" in log, log
        proxy.clear()
        listener.start()
        wait_for(lambda: (site.repo_root / proxy.host / f"{app}:v1" / "big").exists())
        wait_for(lambda: pending_names(site) == [])
        assert temps(site) == []
    finally:
        if listener.proc.poll() is None:
            listener.stop()
        site.close()


@pytest.mark.parametrize("bind, message", [("127.0.0.1:99999", "not host:port"),
                                           ("localhost", "not host:port"),
                                           ("[::1", "not host:port")])
def test_a_bad_bind_is_one_line(tmp_path, bind, message):
    site = Site(tmp_path / "site")
    done = subprocess.run([sys.executable, "-m", "unpacked", "listen", "--bind", bind,
                           "--project", str(site.base)],
                          env=dict(site.env, UNPACKED_LISTEN_SECRET="s"), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 3 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_secret_comes_from_a_setting_or_a_file(tmp_path, caplog):
    from types import SimpleNamespace

    from unpacked.errors import UnpackedError
    from unpacked.service.listen import secret_of
    path = tmp_path / "secret"
    path.write_text("from-a-file\n")
    path.chmod(0o600)
    assert secret_of(SimpleNamespace(listen_secret="", listen_secret_file=path), False) == \
        "from-a-file"
    assert secret_of(SimpleNamespace(listen_secret="set", listen_secret_file=path), False) == \
        "set"
    assert "others can read it" not in caplog.text
    path.chmod(0o644)
    secret_of(SimpleNamespace(listen_secret="", listen_secret_file=path), False)
    assert "others can read it" in caplog.text
    path.write_text("\n")
    with pytest.raises(UnpackedError, match="no shared secret"):
        secret_of(SimpleNamespace(listen_secret="", listen_secret_file=path), False)
    assert secret_of(SimpleNamespace(listen_secret="", listen_secret_file=path), True) is None
    with pytest.raises(UnpackedError, match=f"listen_secret_file {tmp_path / 'nope'}"):
        secret_of(SimpleNamespace(listen_secret="", listen_secret_file=tmp_path / "nope"), True)


def test_insecure_no_auth_accepts_without_a_secret(tmp_path):
    site = Site(tmp_path / "site")
    site.recipe(["http://127.0.0.1:1/wanted/app:v1"])
    env = {k: v for k, v in site.env.items() if not k.startswith("UNPACKED_LISTEN")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unpacked", "listen", "--bind",
                             f"127.0.0.1:{port}", "--project", str(site.base),
                             "--insecure-no-auth"], env={**env, "UNPACKED_LISTEN_DEBOUNCE": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/events"
        wait_for(lambda: _answers(url))
        request = urllib.request.Request(url, data=event_for("127.0.0.1:1/wanted/app:v1"),
                                         headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=10).status == 202
        assert pending_names(site) == ["127.0.0.1:1/wanted/app:v1"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        site.close()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url.replace("/events", "/healthz"), timeout=1)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
