"""The resolve step: wildcards, cached state, HEAD-only re-resolves, local failures."""

import threading
import time

import pytest
from helpers import push_simple, unique

from unpacked import recipe
from unpacked.build.refresh import Refresher, expand, match_tags, run_parallel
from unpacked.build.state import State


def AMD64(recipe):            # noqa: N802 - the platforms every recipe asks for here
    return ("linux/amd64",)


def make_recipe(tmp_path, host, images):
    lines = "\n".join(f"  - 'http://{host}/{i}'" for i in images)
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\ncvmfs_repo: test.cern.ch\ninput:\n{lines}\n")
    return recipe.load(path)


def test_match_tags_is_glob_not_regex():
    tags = ["21.2.10", "21.2.100-2019", "21.2.15", "21.3.10", "2112.1", "latest", "v1", "v2"]
    assert match_tags("21.2.1*", tags) == ["21.2.10", "21.2.100-2019", "21.2.15"]
    assert match_tags("v?", tags) == ["v1", "v2"]
    assert match_tags("*", tags) == sorted(tags)
    assert match_tags("21.2.1?", tags) == ["21.2.10", "21.2.15"]


def test_meanwhile_runs_while_the_threads_work():
    """The run prepares its plan while the HEADs are out: ``meanwhile`` runs in the caller's
    thread at the same time as the work (here each item waits for it), once, also for none."""
    started = threading.Event()
    calls = []

    def work(item: int) -> int:
        if not started.wait(timeout=10):
            raise AssertionError("meanwhile did not run while the work waited")
        return item * 2

    def meanwhile():
        calls.append(threading.current_thread())
        started.set()

    assert run_parallel(work, [1, 2, 3], 2, meanwhile) == [2, 4, 6]
    assert calls == [threading.main_thread()]
    assert run_parallel(work, [], 2, meanwhile) == [] and len(calls) == 2


def test_a_failing_meanwhile_leaves_the_threads_no_further_work():
    """A run whose planning fails (or that is interrupted) releases its locks: the resolve's
    threads end with the item each has, they take no other (and write no more state)."""
    release, done = threading.Event(), []

    def work(item: int) -> None:
        release.wait(timeout=10)
        done.append(item)

    def meanwhile():
        raise OSError("the repository cannot be read")

    with pytest.raises(OSError, match="cannot be read"):
        run_parallel(work, list(range(50)), 2, meanwhile)
    release.set()
    time.sleep(0.5)
    assert len(done) <= 2


def test_an_item_that_raises_ends_the_work_and_is_raised():
    """An item's error reaches the caller (not lost among ten thousand results), and the
    threads take no further item after it; results otherwise come back in order."""
    taken = []

    def work(item: int) -> int:
        taken.append(item)
        if item == 3:
            raise ValueError("item 3 is broken")
        time.sleep(0.01)
        return item

    assert run_parallel(lambda x: -x, list(range(200)), 8) == [-x for x in range(200)]
    assert run_parallel(lambda x: -x, [1, 2], 0) == [-1, -2], "no thread asked for: one"
    with pytest.raises(ValueError, match="item 3 is broken"):
        run_parallel(work, list(range(500)), 2)
    time.sleep(0.3)
    assert 3 in taken and len(taken) < 20


def test_resolve_wildcards_and_failures(tmp_path, registry, layout, make_client, proxy):
    repo, other = unique("wild"), unique()
    for tag in ("1.0", "1.1", "2.0"):
        push_simple(registry, layout, repo, tag)
    push_simple(registry, layout, other)
    recipes = make_recipe(tmp_path, proxy.host, [f"{repo}:1.*", f"{other}:v1", f"{other}:gone"])
    state = State(tmp_path / "cache")
    resolver = Refresher(make_client(), state, per_registry=2)
    outcomes, problems = resolver.run(recipes, AMD64)
    assert problems == []
    by_name = {o.wanted.name: o for o in outcomes}
    assert sorted(by_name) == sorted([f"{proxy.host}/{repo}:1.0", f"{proxy.host}/{repo}:1.1",
                                      f"{proxy.host}/{other}:v1", f"{proxy.host}/{other}:gone"])
    gone = by_name[f"{proxy.host}/{other}:gone"]
    assert gone.resolved is None and "MANIFEST_UNKNOWN" in gone.error
    assert all(o.changed for o in outcomes if o.error is None)
    assert state.failure(f"{proxy.host}/{other}:gone") == gone.error

    # Offline expansion sees the expanded tags; a second resolve costs one HEAD per image.
    assert len(expand(recipes, state, AMD64)) == 4
    proxy.clear()
    outcomes, _ = Refresher(make_client(), state).run(recipes, AMD64)
    assert not any(o.changed for o in outcomes)
    assert proxy.count("GET", "/manifests/") == 1     # only the missing tag, for its reason
    assert proxy.count("GET", "/blobs/") == 0
    assert proxy.count("HEAD") == 4
    assert proxy.count("GET", "/tags/list") == 1


def test_wildcard_listing_failure_keeps_last_expansion(tmp_path, registry, layout, make_client,
                                                       proxy):
    repo = unique("wild")
    push_simple(registry, layout, repo, "1.0")
    recipes = make_recipe(tmp_path, proxy.host, [f"{repo}:1.*"])
    state = State(tmp_path / "cache")
    Refresher(make_client(), state).run(recipes, AMD64)
    proxy.add("/tags/list", "status", status=403, times=9)
    outcomes, problems = Refresher(make_client(), state).run(recipes, AMD64)
    assert [o.wanted.ref.tag for o in outcomes] == ["1.0"]
    assert len(problems) == 1 and "403" in problems[0] and "r.yaml:4" in problems[0]


@pytest.mark.parametrize("read_first", [False, True])
def test_heads_made_before_the_state_is_read_are_settled_after(tmp_path, registry, layout,
                                                               make_client, proxy, read_first):
    """The HEADs start before the state is read (a run's main thread reads it meanwhile):
    answers that come before it are kept and settled after, those after it at once. Either
    way an unmoved tag costs its HEAD alone, and a moved one is resolved anew."""
    repo = unique("early")
    for tag in ("a", "b", "c"):
        push_simple(registry, layout, repo, tag)
    recipes = make_recipe(tmp_path, proxy.host, [f"{repo}:a", f"{repo}:b", f"{repo}:c",
                                                 f"{repo}:absent"])
    first, _ = Refresher(make_client(), State(tmp_path / "cache")).run(recipes, AMD64)
    push_simple(registry, layout, repo, "b", files={"moved.txt": b"b moved"})
    proxy.clear()
    state = State(tmp_path / "cache")         # nothing read yet, as at a run's start
    meanwhile = (lambda: state.resolved(f"{proxy.host}/{repo}:a")) if read_first \
        else (lambda: None)
    outcomes, _ = Refresher(make_client(), state).run(recipes, AMD64, meanwhile=meanwhile)
    by_tag = {o.wanted.ref.tag: o for o in outcomes}
    assert [by_tag[t].changed for t in "abc"] == [False, True, False]
    assert by_tag["b"].resolved.top_digest != first[1].resolved.top_digest
    assert by_tag["a"].resolved == first[0].resolved
    assert "MANIFEST_UNKNOWN" in by_tag["absent"].error
    assert proxy.count("HEAD") == 4, "one HEAD per image, none again after the state is read"
    assert proxy.count("GET", "/manifests/") == 2     # the moved tag's, the absent tag's reason


def test_a_head_answer_without_a_digest_is_not_asked_again(tmp_path, registry, layout,
                                                            make_client, proxy):
    """A registry whose HEADs name no digest: the image is fetched by tag after them, not
    HEADed once more (a hostile registry would double every run's requests)."""
    repo = unique("nodigest")
    push_simple(registry, layout, repo, "v1")
    recipes = make_recipe(tmp_path, proxy.host, [f"{repo}:v1"])
    Refresher(make_client(), State(tmp_path / "cache")).run(recipes, AMD64)
    proxy.clear()
    proxy.add("/manifests/", "status", status=200, method="HEAD", times=99,
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    outcomes, _ = Refresher(make_client(), State(tmp_path / "cache")).run(recipes, AMD64)
    assert outcomes[0].error is None and not outcomes[0].changed
    heads = proxy.count("HEAD")
    assert heads == 2, "the lean HEAD, and the full path's once it named no digest"
    assert proxy.count("GET", "/manifests/v1") == 1


def test_a_repository_that_asks_for_a_token_is_asked_once_then_with_it(
        tmp_path, token_registry, layout, make_client):
    """A token registry, tokens not cached: each repository's first tag meets the 401 and
    goes on the full path, which fetches the token; its other tags wait for it, then go on
    the lean path with it: one token and three HEADs per repository, one HEAD per other tag."""
    from helpers import creds_for
    from helpers.faults import FaultProxy
    repos = [unique("tok") for _ in range(3)]
    for repo in repos:
        for tag in "abcd":
            push_simple(token_registry, layout, repo, tag)
    proxy = FaultProxy(token_registry.host)
    try:
        recipes = make_recipe(tmp_path, proxy.host, [f"{r}:{t}" for r in repos for t in "abcd"])
        creds = creds_for(proxy.host)
        state = State(tmp_path / "cache")
        first, _ = Refresher(make_client(creds, cache=False), state, 1).run(recipes, AMD64)
        assert not [o.error for o in first if o.error]
        proxy.clear()
        issued = len(token_registry.issuer.requests)
        outcomes, _ = Refresher(make_client(creds, cache=False), state, 1).run(recipes, AMD64)
        assert not [o.error for o in outcomes if o.error] and not any(o.changed for o in outcomes)
        assert len(token_registry.issuer.requests) - issued == 3, "one token per repository"
        assert proxy.count("HEAD") == 3 * 3 + 3 * 3
        assert proxy.count("GET") == 0
    finally:
        proxy.stop()


def test_a_registry_that_answers_unusually_is_left_to_the_full_path(tmp_path, registry, layout,
                                                                     make_client, proxy):
    """A 503 in the middle of the round: that registry's tags not yet asked go on the full
    path (its retries, its backoff), and every image still resolves."""
    repo = unique("busy")
    tags = [f"t{i}" for i in range(12)]
    for tag in tags:
        push_simple(registry, layout, repo, tag)
    recipes = make_recipe(tmp_path, proxy.host, [f"{repo}:{t}" for t in tags])
    state = State(tmp_path / "cache")
    Refresher(make_client(), state, 1).run(recipes, AMD64)
    proxy.clear()
    proxy.add(f"/manifests/{tags[3]}$", "status", status=503, method="HEAD", times=1)
    outcomes, _ = Refresher(make_client(), state, 1).run(recipes, AMD64)
    assert not [o.error for o in outcomes if o.error] and not any(o.changed for o in outcomes)
    forwarded = [r for r in proxy.received if r[0] == "HEAD"]     # the 503 is the proxy's
    lean = ["Accept-Encoding" not in r[2] for r in forwarded]      # requests sends it
    assert lean == [True] * 3 + [False] * (len(tags) - 3), \
        "the round asked the first tags; after the 503 only the full path asked"
    assert proxy.count("HEAD") == len(tags) + 1, "the 503'd tag was asked again, once"


def test_credentials_that_cannot_be_read_fail_each_image_alone(tmp_path, token_registry,
                                                               registry, layout, make_client):
    """A credentials file that cannot be read, and a registry that asks for a token: each of
    its images fails with the reason, the run's other registries are not held up, and every
    share of a registry is given back."""
    from unpacked.registry.auth import CredentialsError
    repos = [unique("creds") for _ in range(2)]
    for repo in repos:
        for tag in "ab":
            push_simple(token_registry, layout, repo, tag)
    free = unique("free")
    push_simple(registry, layout, free)

    def broken(host):
        raise CredentialsError("credentials file /x/config.json: not valid JSON")
    recipes = make_recipe(tmp_path, token_registry.host,
                          [f"{r}:{t}" for r in repos for t in "ab"])
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text() +
                                     f"  - 'http://{registry.host}/{free}:v1'\n")
    recipes = recipe.load(tmp_path / "r.yaml")
    resolver = Refresher(make_client(broken, cache=False), State(tmp_path / "cache"), 2)
    outcomes, _ = resolver.run(recipes, AMD64)
    by_name = {o.wanted.name: o for o in outcomes}
    assert by_name[f"{registry.host}/{free}:v1"].error is None
    failed = [o for o in outcomes if o.error]
    assert len(failed) == 4 and all("not valid JSON" in o.error for o in failed)
    assert {h: s._value for h, s in resolver._limits.items()} == \
        {token_registry.host: 2, registry.host: 2}
