"""``unpacked convert IMAGE``: the named images now, through the same tasks, locks and one
transaction, with no garbage collection and no record of other tasks lost."""

from __future__ import annotations

import subprocess

import pytest
from helpers import unique, unstamped
from helpers.images import Entry
from helpers.pipeline import push, start_slow
from helpers.site import Site

from unpacked.build import doit_private


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    yield s
    s.close()


def convert(site, *args):
    return subprocess.run(["unpacked", "convert", *args], env=site.env, cwd=site.base,
                          capture_output=True, text=True, timeout=300)


def test_converts_only_what_is_named(registry, layout, site):
    a, b = unique("conv-a"), unique("conv-b")
    push(registry, layout, a, "v1", [Entry("a", b"1")])
    for tag in ("1.0", "1.1"):
        push(registry, layout, b, tag, [Entry("b", tag.encode())])
    site.recipe([f"http://{registry.host}/{a}:v1", f"http://{registry.host}/{b}:1.*"])
    assert site.doit().returncode == 0
    rows = set(doit_private.recorded_values(site.cache / "doit.sqlite"))
    push(registry, layout, a, "v1", [Entry("a", b"2")])
    push(registry, layout, b, "1.1", [Entry("b", b"1.1 moved")])
    done = convert(site, f"http://{registry.host}/{a}:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    public = site.repo_root / registry.host / f"{a}:v1"
    assert str(public) in done.stdout.splitlines()
    assert (public / "a").read_bytes() == b"2"
    assert (site.repo_root / registry.host / f"{b}:1.1" / "b").read_bytes() == b"1.1"
    assert "gc:" not in done.stdout
    assert rows <= set(doit_private.recorded_values(site.cache / "doit.sqlite"))
    assert site.revision() == 2
    smuggled = convert(site, f"{registry.host}/{b}:1.1@sha256:{'0' * 64}")
    assert smuggled.returncode == 3 and "not named by any recipe" in smuggled.stderr, \
        "a wildcard matches tags, never a digest beside one"
    done = convert(site, f"{registry.host}/{b}:1.1")        # through the wildcard input
    assert done.returncode == 0, done.stderr
    assert (site.repo_root / registry.host / f"{b}:1.1" / "b").read_bytes() == b"1.1 moved"
    again = site.doit()
    assert again.returncode == 0 and again.stdout == "", again.stdout


def test_an_image_no_recipe_names_needs_adhoc(registry, layout, site):
    wanted, other = unique("named"), unique("adhoc")
    push(registry, layout, wanted, "v1", [Entry("w", b"w")])
    push(registry, layout, other, "v1", [Entry("o", b"o")])
    site.recipe([f"http://{registry.host}/{wanted}:v1"])
    done = convert(site, f"http://{registry.host}/{other}:v1")
    assert done.returncode == 3
    assert "not named by any recipe" in done.stderr and "--adhoc" in done.stderr
    done = convert(site, "--adhoc", f"http://{registry.host}/{other}:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    public = site.repo_root / registry.host / f"{other}:v1"
    assert (public / "o").read_bytes() == b"o"
    dry = subprocess.run(["unpacked", "gc", "--dry-run"], env=site.env, cwd=site.base,
                         capture_output=True, text=True)
    assert f"image {registry.host}/{other}:v1: dropped from every recipe" in dry.stdout


def test_waits_for_a_running_conversion(registry, layout, site, proxy):
    busy = unique("busy")
    _, run = start_slow(registry, layout, site, proxy, busy, 2 << 20, 0.05)
    now = convert(site, f"http://{proxy.host}/{busy}:v1")
    assert now.returncode == 75 and "another run" in now.stderr
    later = convert(site, "--wait", "120", f"http://{proxy.host}/{busy}:v1")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert later.returncode == 0, later.stdout + later.stderr
    assert not [x for x in unstamped(later.stdout) if "added" in x and busy in x], \
        "converted by the first run; the second found it done"


def test_status_says_what_the_run_did(registry, layout, site):
    import json
    good = unique("stat")
    push(registry, layout, good, "v1", [Entry("s", b"s")])
    site.recipe([f"http://{registry.host}/{good}:v1",
                 f"http://{registry.host}/{unique('none')}:v1"])
    site.env["UNPACKED_METRICS_FILE"] = str(site.base / "metrics" / "unpacked.prom")
    site.env["UNPACKED_NOTIFICATION_FILE"] = str(site.base / "notifications.jsonl")
    done = site.doit()
    assert done.returncode == 1
    status = json.loads((site.cache / "status.json").read_text())
    assert status["exit_code"] == 1 and status["counts"]["added"] == 1
    assert status["counts"]["failed"] == 1 and len(status["failures"]) == 1
    assert status["repositories"][site.repo]["revision"] == 1
    assert status["counts"]["layers_ingested"] == 2 and status["counts"]["bytes_downloaded"] > 0
    from prometheus_client.parser import text_string_to_metric_families
    text = (site.base / "metrics" / "unpacked.prom").read_text()
    metrics = {m.name: m for m in text_string_to_metric_families(text)}
    images = {s.labels["state"]: s.value for s in metrics["unpacked_images"].samples}
    assert images["added"] == 1 and images["failed"] == 1
    assert metrics["unpacked_last_run_exit_code"].samples[0].value == 1
    assert metrics["unpacked_layers_ingested"].samples[0].value == 2
    lines = [json.loads(x) for x in (site.base / "notifications.jsonl").read_text().splitlines()]
    actions = [x["action"] for x in lines]
    assert actions[0] == "start_ducc" and actions[-1] == "end_ducc"
    assert actions.count("start_layer_conversion") == actions.count("end_layer_conversion") == 2
    ends = [x for x in lines if x["action"] == "end_flat_conversion"]
    assert ends[0]["status"] == "ok" and ends[0]["time_elapsed_s"] >= 0
    shown = subprocess.run(["unpacked", "status", "--json"], env=site.env, cwd=site.base,
                           capture_output=True, text=True)
    doc = json.loads(shown.stdout)
    states = {i["name"].split("/", 1)[1]: i["state"] for i in doc["images"]}
    assert states[f"{good}:v1"] == "published"
    assert sorted(states.values()) == ["failed", "published"]
    shown_good = next(i for i in doc["images"] if i["name"].endswith(f"{good}:v1"))
    pushed = json.loads((site.repo_root / ".metadata" / shown_good["name"] /
                         "image.json").read_text())
    assert shown_good["platforms"][0]["config"] == pushed["config_digest"]
    assert shown_good["tag_digest"].startswith("sha256:") and shown_good["failure"] is None
    assert shown_good["public_paths"] == [shown_good["name"]]       # under the repository
    assert (site.repo_root / shown_good["public_paths"][0]).is_symlink()
    failed = next(i for i in doc["images"] if i["state"] == "failed")
    assert "registry answered 404 MANIFEST_UNKNOWN" in failed["failure"]

    limited = convert(site, f"{registry.host}/{good}:v1")          # the listener's kind of run
    assert limited.returncode == 0, limited.stdout + limited.stderr
    after = json.loads((site.cache / "status.json").read_text())
    assert after["exit_code"] == 1 and after["failures"] == status["failures"], \
        "a limited run does not hide that the full run failed"
    assert after.get("last_success") is None
    assert after["last_limited_run"]["exit_code"] == 0 and after["totals"]["runs"] == 2
    metrics = {m.name: m for m in text_string_to_metric_families(
        (site.base / "metrics" / "unpacked.prom").read_text())}
    assert metrics["unpacked_last_run_exit_code"].samples[0].value == 1
    assert metrics["unpacked_last_limited_run_exit_code"].samples[0].value == 0
    shown = subprocess.run(["unpacked", "status"], env=site.env, cwd=site.base,
                           capture_output=True, text=True)
    assert "last run: exit 1" in shown.stdout and "last limited run: exit 0" in shown.stdout
