"""What an operator meets in a day, through the real ``doit`` and ``unpacked`` entry points:
every mistake is one line with the right exit code, nothing published is lost by a mistake,
and the output of a cron run can be read."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from helpers import STAMP, push_simple, unique, unstamped
from helpers.images import Entry
from helpers.pipeline import push
from helpers.site import PROJECT, Site

from unpacked.build import doit_private


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    yield s
    s.close()


def snapshot(root) -> dict:
    out = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.relative_to(root).parts[0] == ".unpacked":
            continue                # the local publisher's lock and journal
        st = os.lstat(path)
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                            os.readlink(path) if path.is_symlink() else None)
    return out


def unpacked(site, *args, cwd=None):
    return subprocess.run(["unpacked", *args], capture_output=True, text=True, env=site.env,
                          cwd=cwd or site.base, timeout=120)


@pytest.fixture
def converted(registry, layout, site):
    """A site with one image converted and published."""
    repo = unique("op")
    push(registry, layout, repo, "v1", [Entry("a", b"a")], WorkingDir="/opt/app")
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 0, done.stderr
    return site, repo


# -- errors: one line, the right exit code, everywhere ---------------------------------------

MISTAKES = [
    # (what, doit arguments, environment, the line expected, exit code)
    ("platform without os", ["platform=arm64"], {}, "setting platform: 'arm64' is not", 3),
    ("publisher typo", ["publisher=cvfms"], {}, "setting publisher: 'cvfms' is not", 3),
    ("jobs not a number", ["jobs=abc"], {}, "setting jobs: 'abc' is not an integer", 3),
    ("gc maybe", ["gc=maybe"], {}, "setting gc: 'maybe' is not one of", 3),
    ("flatten symlink", ["flatten=symlink"], {}, "setting flatten: 'symlink' is not", 3),
    ("timeout zero", ["timeout=0"], {}, "setting timeout: 0 must be more than 0", 3),
    ("timeout nan", ["timeout=nan"], {}, "setting timeout: 'nan' is not a finite", 3),
    ("timeout forever", ["timeout=1e10"], {}, "setting timeout: 1e10 must be at most", 3),
    ("jobs by the thousand", ["jobs=99999"], {}, "setting jobs: 99999 must be at most 256",
     3),
    ("now yesterday", ["now=yesterday"], {}, "setting now: 'yesterday' is neither", 3),
    ("negative grace", ["gc_grace=-1"], {}, "setting gc_grace: -1 must be at least 0", 3),
    ("no deletions", ["gc_max_deletions=0"], {}, "gc_max_deletions: 0 must be at least 1", 3),
    ("misspelt variable", ["platfrom=linux/arm64"], {}, "did you mean platform?", 3),
    ("misspelt environment", [], {"UNPACKED_PLATFROM": "x"},
     "did you mean UNPACKED_PLATFORM?", 3),
]


@pytest.mark.parametrize("what, args, env, line, code", MISTAKES, ids=[m[0] for m in MISTAKES])
@pytest.mark.parametrize("command", [(), ("list",), ("info", "publish"), ("forget", "publish")])
def test_a_wrong_setting_is_one_line(converted, what, args, env, line, code, command):
    site, _ = converted
    before = snapshot(site.repo_root)
    site.env.update(env)
    done = site.doit(*command, *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert line in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert snapshot(site.repo_root) == before


CLI_MISTAKES = [
    # (what, unpacked arguments, environment, the line expected, exit code)
    ("platform without os", ["manifest", "--platform", "arm64", "fedora"], {},
     "error: setting platforms: 'arm64' is not os/arch", 3),
    ("bad reference", ["manifest", "http://bad:host:x/y"], {},
     "error: 'http://bad:host:x/y': invalid registry host", 3),
    ("image no recipe names", ["convert", "http://127.0.0.1:1/other/z:v1"], {},
     "not named by any recipe (--adhoc converts it anyway", 3),
    ("no such project", ["status", "--project", "/nonexistent"], {},
     "error: project folder /nonexistent: no such folder", 3),
    ("misspelt environment", ["gc", "--dry-run"], {"UNPACKED_GC_GRAEC": "1"},
     "did you mean UNPACKED_GC_GRACE?", 3),
    ("unknown option", ["manifest", "--timeout", "0", "fedora"], {},
     "No such option '--timeout'", 2),
    ("unknown command", ["nosuch"], {}, "No such command 'nosuch'", 2),
]


@pytest.mark.parametrize("what, args, env, line, code", CLI_MISTAKES,
                         ids=[m[0] for m in CLI_MISTAKES])
def test_a_wrong_unpacked_command_is_one_line(converted, what, args, env, line, code):
    site, _ = converted
    before = snapshot(site.repo_root)
    site.env.update(env)
    done = unpacked(site, *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert line in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith(("error:", "Error:"))]
    assert len(errors) == 1, done.stderr
    assert snapshot(site.repo_root) == before


def test_a_long_repository_name_is_a_recipe_error(site):
    (site.recipes / "r.yaml").write_text(f"version: 1\ncvmfs_repo: {'a' * 300}\n"
                                         "input:\n  - fedora\n")
    for args in ((), ("list",)):
        done = site.doit(*args)
        assert done.returncode == 3 and "r.yaml:2: cvmfs_repo: must be" in done.stderr
        assert "Traceback" not in done.stderr


def test_environment_mistakes_are_one_line(converted, tmp_path):
    site, repo = converted
    before = snapshot(site.repo_root)
    tokens = site.cache / "tokens"
    if tokens.exists():
        subprocess.run(["rm", "-rf", str(tokens)], check=True)
    tokens.write_text("a file where a folder belongs")
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text("{not json")
    site.env["DOCKER_CONFIG"] = str(docker)
    done = site.doit()
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert done.returncode == 0, out          # an unchanged tag: one HEAD, no credential asked
    assert snapshot(site.repo_root) == before
    unpack = unpacked(site, "manifest", "--platform", "arm64", "fedora")
    assert unpack.returncode == 3 and "setting platform" in unpack.stderr + unpack.stdout
    assert "Traceback" not in unpack.stderr


def test_a_full_cache_disk_is_one_line_and_unpublishes_nothing(converted, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    site, _ = converted
    before = snapshot(site.repo_root)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=4k"],
                       capture_output=True)
        site.env["UNPACKED_CACHE"] = str(full)
        for args in ((), ("gc",)):
            done = site.doit(*args)
            out = done.stdout + done.stderr
            assert done.returncode == 3, out
            assert "disk is full" in out and "Traceback" not in out, out
        done = unpacked(site, "convert", "--adhoc", "http://127.0.0.1:1/x:y")
        assert "Traceback" not in done.stdout + done.stderr
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
    assert snapshot(site.repo_root) == before


def test_credentials_file_mistake_names_the_file(basic_registry, layout, site, tmp_path):
    registry = basic_registry                     # it asks for credentials
    repo = unique("creds")
    push_simple(registry, layout, repo)
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text('{"auths": {"x": {"auth": "!!!"}}}')
    site.env["DOCKER_CONFIG"] = str(tmp_path / "docker")
    (tmp_path / "docker" / "config.json").write_text("{not json")
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    done = site.doit()
    assert done.returncode == 1
    lines = [x for x in unstamped(done.stdout) if "failed" in x and repo in x]
    assert len(lines) == 1 and "config.json: not valid JSON" in lines[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_a_plain_http_registry_written_as_https(registry, site):
    site.recipe([f"https://{registry.host}/x/y:v1"])
    started = time.time()
    done = site.doit()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"use http://{registry.host}/" in done.stdout
    assert time.time() - started < 30, "not retried: retrying cannot mend it"


def test_unpacked_works_from_any_folder(converted, tmp_path):
    site, repo = converted
    env = {k: v for k, v in site.env.items() if k != "UNPACKED_RECIPES"}
    (site.base / "project").mkdir()
    (site.base / "project" / "recipes").symlink_to(site.recipes)
    project = site.base / "project"
    for args, extra in ((["--project", str(project)], {}), ([], {"UNPACKED_PROJECT":
                                                                str(project)})):
        done = subprocess.run(["unpacked", "check", *args], env={**env, **extra},
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert repo in done.stdout
    done = subprocess.run(["unpacked", "check", "--project", str(tmp_path / "nope")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "no such folder" in done.stderr


def test_gc_dry_run_changes_nothing_and_needs_a_repository(converted):
    site, _ = converted
    clocks = site.cache / "gc" / f"{site.repo}.json"
    before = (clocks.read_bytes(), os.stat(clocks).st_mtime_ns)
    repo_before = snapshot(site.repo_root)
    cached = {p.name: p.stat().st_mtime_ns for p in (site.cache / "gc").iterdir()}
    done = unpacked(site, "gc", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert (clocks.read_bytes(), os.stat(clocks).st_mtime_ns) == before
    assert {p.name: p.stat().st_mtime_ns for p in (site.cache / "gc").iterdir()} == cached
    assert snapshot(site.repo_root) == repo_before
    site.env["UNPACKED_ROOT"] = str(site.base / "elsewhere")
    done = unpacked(site, "gc", "--dry-run")
    assert done.returncode == 3 and "does not exist" in done.stderr


# -- mistakes never unpublish ------------------------------------------------------------------

def test_a_broken_recipe_file_keeps_its_images(registry, layout, site):
    a, b = unique("ra"), unique("rb")
    push(registry, layout, a, "v1", [Entry("a", b"a")])
    push(registry, layout, b, "v1", [Entry("b", b"b")])
    site.recipe([f"http://{registry.host}/{a}:v1"], name="a.yaml")
    site.recipe([f"http://{registry.host}/{b}:v1"], name="b.yaml")
    assert site.doit().returncode == 0
    (site.recipes / "b.yaml").write_text("version: 1\ncvmfs_repo: test.cern.ch\ninptu: []\n")
    push(registry, layout, a, "v1", [Entry("a", b"a2")])
    done = site.doit()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "b.yaml:3: inptu: unknown key" in done.stdout
    assert (site.repo_root / registry.host / f"{a}:v1" / "a").read_bytes() == b"a2"
    assert (site.repo_root / registry.host / f"{b}:v1" / "b").read_bytes() == b"b", \
        "the broken file's image stays published"
    assert "1 updated" in done.stdout


def test_an_emptied_recipe_unpublishes_nothing(registry, layout, site):
    repos = [unique("mass") for _ in range(3)]
    for repo in repos:
        push_simple(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{r}:v1" for r in repos])
    assert site.doit().returncode == 0
    site.recipe([f"http://{registry.host}/{repos[0]}:v1"])
    done = site.doit()
    assert done.returncode == 1
    assert "2 of 3 published images would be unpublished at once" in done.stdout
    for repo in repos:
        assert (site.repo_root / registry.host / f"{repo}:v1").is_symlink()
    done = site.doit("gc_max_dropped=5")
    assert done.returncode == 0 and "gc: 2 deleted" in done.stdout, done.stdout
    assert not (site.repo_root / registry.host / f"{repos[1]}:v1").exists()


def test_runs_limited_to_some_tasks_keep_records_and_collect_nothing(registry, layout, site,
                                                                       tmp_path):
    a, b = unique("la"), unique("lb")
    push_simple(registry, layout, a)
    push_simple(registry, layout, b)
    site.recipe([f"http://{registry.host}/{a}:v1", f"http://{registry.host}/{b}:v1"])
    assert site.doit().returncode == 0
    db = site.cache / "doit.sqlite"
    rows = set(doit_private.recorded_values(db))
    other = tmp_path / "other.yaml"
    other.write_text(f"version: 1\ncvmfs_repo: {site.repo}\ninput:\n"
                     f"  - 'http://{registry.host}/{a}:v1'\n")
    for args in ([f"image:{registry.host}/{a}:v1"], [f"recipes={other}"]):
        done = site.doit(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "gc:" not in done.stdout
        assert (site.repo_root / registry.host / f"{b}:v1").is_symlink()
        assert rows <= set(doit_private.recorded_values(db)), "no record of other tasks lost"
    done = site.doit()
    assert done.returncode == 0 and done.stdout == "", "nothing to redo: records were kept"


def test_an_image_gone_upstream_is_served_reported_not_failed(registry, layout, site):
    repo, never = unique("goneop"), unique("never")
    push_simple(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{repo}:v1"])
    assert site.doit().returncode == 0
    registry.delete_tag(repo, "v1")
    for _ in range(2):
        done = site.doit()
        assert done.returncode == 0, done.stdout
        assert f"gone upstream, kept: {registry.host}/{repo}:v1" in done.stdout
    site.recipe([f"http://{registry.host}/{repo}:v1", f"http://{registry.host}/{never}:v1"])
    assert site.doit().returncode == 1, "never converted and 404: a failure"


# -- output an operator can use ----------------------------------------------------------------

def test_a_summary_names_up_to_twenty_then_counts(registry, layout, site):
    repo = unique("many")
    push_simple(registry, layout, repo)
    tags = [f"t{i:02d}" for i in range(23)]
    registry.retag(repo, "v1", tags)
    site.recipe([f"http://{registry.host}/{repo}:{t}" for t in tags])
    done = site.doit()
    assert done.returncode == 0, done.stdout + done.stderr
    named = [x for x in unstamped(done.stdout) if x.startswith("  added ")]
    assert len(named) == 20 and named[0].endswith(f"{repo}:t00")
    assert "  added: 3 more" in unstamped(done.stdout), done.stdout


def test_cron_output_is_stamped_and_names_what_changed(registry, layout, tmp_path):
    site = Site(tmp_path / "cv", publisher="cvmfs")
    try:
        repos = [unique("cron") for _ in range(2)]
        for repo in repos:
            push_simple(registry, layout, repo)
        site.recipe([f"http://{registry.host}/{r}:v1" for r in repos]
                    + [f"http://{registry.host}/{unique('missing')}:v1"])
        site.env["UNPACKED_GC_MAX_DROPPED"] = "5"
        done = site.doit()
        assert done.returncode == 1
        lines = (done.stdout + done.stderr).splitlines()
        assert lines and all(STAMP.match(line) for line in lines), lines
        text = "\n".join(unstamped(done.stdout))
        for repo in repos:
            assert f"added {registry.host}/{repo}:v1" in text
        assert "failed " in text and "missing" in text
        site.recipe([f"http://{registry.host}/{repos[0]}:v1"])
        done = site.doit()
        assert "gc: 1 deleted" in done.stdout
        message = site.calls()[-1][2]
        assert "gc deleted 1" in message, message
    finally:
        site.close()


def test_info_says_why_in_words(converted):
    site, repo = converted
    layer = next(t for t in unstamped(site.doit("list", "--all").stdout)
                 if t.startswith("layer:")).split()[0]
    assert site.doit("forget", layer).returncode == 0
    done = site.doit("info", layer)
    assert done.returncode == 1 and "not recorded as ingested (new, or forgotten)" in done.stdout
    assert "args=None" not in done.stdout
    listing = site.doit("list", "--all", "-s").stdout
    assert "R layer " in listing and "U image " in listing, listing
    assert site.doit().returncode == 0
    listing = site.doit("list", "--all", "-s").stdout
    assert not [x for x in listing.splitlines() if x.startswith("R ")], listing


def test_cosmetics(registry, converted):
    site, repo = converted
    site.recipe([f"http://{registry.host}/{unique('absent')}:v1"])
    site.env["UNPACKED_GC_IMAGE_GRACE"] = "1"
    done = unpacked(site, "gc", "--dry-run")
    assert "for 0.0 days" in done.stdout and "-0.0" not in done.stdout, done.stdout
    listing = site.doit("list", "--all").stdout
    assert "1 images" not in listing and "1 layers" not in listing and "(1 image)" in listing
    shown = unpacked(site, "manifest", f"http://{registry.host}/{repo}:v1")
    assert 'workingdir: "/opt/app"' in shown.stdout, shown.stdout


def test_thin_warning_only_when_a_push_is_due(registry, layout, site):
    repo = unique("thinwarn")
    push_simple(registry, layout, repo)
    site.recipe([f"http://{registry.host}/{repo}:v1"],
                extra=f"output_format: 'http://{registry.host}/thin/$(image)'\n")
    site.env["UNPACKED_ANONYMOUS"] = ""
    done = site.doit()
    assert "no credentials are set" in done.stderr
    assert site.doit().stderr == "", "no push due: no warning"
    site.doit("forget", f"thin:{registry.host}/{repo}:v1")
    site.env["UNPACKED_ANONYMOUS"] = registry.host
    done = site.doit()
    assert "no credentials are set" not in done.stderr, "marked as intentionally anonymous"


# -- other users, other folders ----------------------------------------------------------------

def _read_only(path) -> bool:
    first = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if first.returncode:
        return False
    return subprocess.run(["mount", "-o", "remount,ro,bind", str(path)],
                          capture_output=True).returncode == 0


def test_a_reader_of_the_cache_can_list_and_inspect(converted):
    site, repo = converted
    if not _read_only(site.cache):
        pytest.skip("cannot make a read-only bind mount here (needs root and mount rights)")
    try:
        listing = site.doit("list", "--all", "-s")
        assert listing.returncode == 0, listing.stderr
        assert "Traceback" not in listing.stderr
        layers = [t.split()[1] for t in listing.stdout.splitlines() if " layer:" in t]
        assert layers, listing.stdout + listing.stderr
        layer = layers[0]
        info = site.doit("info", layer)
        assert info.returncode == 0 and "ingested" in info.stdout, info.stdout + info.stderr
        run = site.doit()
        assert run.returncode == 3, run.stderr
        assert len(run.stderr.splitlines()) == 1 and "cannot take the lock" in run.stderr
    finally:
        subprocess.run(["umount", str(site.cache)], capture_output=True)


def test_doit_from_the_project_needs_no_settings(tmp_path):
    done = subprocess.run(["python3", "-m", "doit", "list"], cwd=PROJECT, capture_output=True,
                          text=True, env={**os.environ, "UNPACKED_CACHE": str(tmp_path)},
                          timeout=60)
    assert done.returncode == 0 and "publish" in done.stdout, done.stderr


def test_a_run_that_leaves_at_once_says_and_writes_everything_first(tmp_path):
    """``doit`` from the command line ends without the interpreter's teardown (``leave``):
    its exit code, what it printed and logged (buffered, as in cron), all still there;
    atexit work is not done."""
    import sys
    log = tmp_path / "run.log"
    script = f"""
import atexit, logging, logging.handlers, sys
from unpacked.build.session import leave
kept = logging.handlers.MemoryHandler(1000, flushLevel=logging.CRITICAL,
                                      target=logging.FileHandler({str(log)!r}))
logging.getLogger("unpacked").addHandler(kept)
logging.getLogger("unpacked").warning("logged before the end")
atexit.register(lambda: open({str(tmp_path / 'teardown')!r}, 'w').close())
sys.stdout.write("the summary\\n")
sys.stderr.write("a warning")
leave(3)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 3
    assert done.stdout == "the summary\n" and done.stderr == "a warning"
    assert "logged before the end" in log.read_text()
    assert not (tmp_path / "teardown").exists()


def test_what_breaks_doits_runner_fails_the_run_and_says_what(tmp_path, capsys):
    """doit ends its run in a ``finally`` (it calls our reporter's ``complete_run``); an
    error that broke its runner (a task it could not send to its process workers) must not
    end as exit code 0 with nothing said, as it did."""
    import json

    from unpacked.build.context import Context
    from unpacked.build.reporter import Reporter
    from unpacked.build.session import Session
    from unpacked.recipe import RecipeSet
    from unpacked.settings import load
    settings = load({"cache": str(tmp_path / "cache"), "root": str(tmp_path / "cvmfs"),
                     "recipes": str(tmp_path / "r")}, environ={}, project=tmp_path)
    settings.cache_dir.mkdir(parents=True)
    reporter = Reporter(Session(Context(settings, RecipeSet([], [], [])), full=False))
    with pytest.raises(SystemExit) as ended:
        try:
            raise TypeError("cannot pickle 'mappingproxy' object")
        finally:
            reporter.complete_run()
    assert ended.value.code == 3
    err = capsys.readouterr().err
    assert "the run broke: TypeError: cannot pickle 'mappingproxy' object" in err
    assert "Traceback" in err           # a bug of ours: its traceback, for the report
    run = json.loads((settings.cache_dir / "status.json").read_text())["last_limited_run"]
    assert run["exit_code"] == 3 and any("the run broke" in e for e in run["errors"])


def test_ending_the_workers_copes_with_one_already_ended(tmp_path):
    """doit's own process workers (``-P process``) may have ended, unreaped, when the run
    ends its children: asking each whether it is alive drops the ended one from
    multiprocessing's set, which must not be the set being walked (it raised 'Set changed
    size during iteration' at the run's end, and the run exited 3)."""
    import multiprocessing
    import time

    from unpacked.build.context import Context
    from unpacked.build.session import Session
    from unpacked.recipe import RecipeSet
    from unpacked.settings import load
    settings = load({"cache": str(tmp_path / "cache"), "root": str(tmp_path / "cvmfs"),
                     "recipes": str(tmp_path / "r")}, environ={}, project=tmp_path)
    session = Session(Context(settings, RecipeSet([], [], [])), full=False)
    ended = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    ended.start()
    time.sleep(0.5)                 # it has ended; nothing has reaped it yet
    assert ended in multiprocessing.process._children
    session.stop_workers()
    assert ended.exitcode == 0 and ended not in multiprocessing.process._children
