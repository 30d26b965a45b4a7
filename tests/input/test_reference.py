"""Image references: every accepted form, Docker's normalisation, placeholders."""

import pytest

from unpacked import reference
from unpacked.errors import BadReference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text, scheme, registry, repository, tag, digest, api", [
    ("https://registry.hub.docker.com/library/fedora:latest", "https",
     "registry.hub.docker.com", "library/fedora", "latest", None, "registry-1.docker.io"),
    ("http://127.0.0.1:5000/team/img:1.0", "http", "127.0.0.1:5000", "team/img", "1.0", None,
     "127.0.0.1:5000"),
    ("127.0.0.1:5000/team/img:1.0", "https", "127.0.0.1:5000", "team/img", "1.0", None,
     "127.0.0.1:5000"),
    ("fedora", "https", "docker.io", "library/fedora", "latest", None, "registry-1.docker.io"),
    ("library/fedora:39", "https", "docker.io", "library/fedora", "39", None,
     "registry-1.docker.io"),
    ("someone/tool", "https", "docker.io", "someone/tool", "latest", None,
     "registry-1.docker.io"),
    ("ghcr.io/org/img", "https", "ghcr.io", "org/img", "latest", None, "ghcr.io"),
    ("index.docker.io/debian:stable", "https", "index.docker.io", "library/debian", "stable",
     None, "registry-1.docker.io"),
    ("localhost/x:y", "https", "localhost", "x", "y", None, "localhost"),
    (f"ghcr.io/org/img@{D}", "https", "ghcr.io", "org/img", None, D, "ghcr.io"),
    (f"ghcr.io/org/img:1@{D}", "https", "ghcr.io", "org/img", "1", D, "ghcr.io"),
    ("https://gitlab-p4n.aip.de:5005/c4p/stacks/wlcg-wn:latest", "https",
     "gitlab-p4n.aip.de:5005", "c4p/stacks/wlcg-wn", "latest", None, "gitlab-p4n.aip.de:5005"),
    ("https://registry.hub.docker.com/atlas/analysisbase:21.2.1*", "https",
     "registry.hub.docker.com", "atlas/analysisbase", "21.2.1*", None, "registry-1.docker.io"),
])
def test_accepted_forms(text, scheme, registry, repository, tag, digest, api):
    ref = reference.parse(text)
    assert (ref.scheme, ref.registry, ref.repository, ref.tag, ref.digest) == \
        (scheme, registry, repository, tag, digest)
    assert ref.api_host == api
    assert ref.base_url == f"{scheme}://{api}"


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("ftp://host/x:1", "scheme"),
    ("https:///x:1", "no registry host"),
    ("Fedora", "lowercase"),
    ("host.io/a//b", "invalid repository component"),
    ("host.io/x:", "empty tag"),
    ("host.io/x@", "empty digest"),
    ("host.io/x@sha256:abc", "64"),
    ("host.io/x@md5:" + "a" * 32, "unsupported digest"),
    ("host.io/x:bad tag", "invalid tag"),
    ("host.io/x:1*@" + D, "wildcard"),
    ("https://bad_host!/x", "invalid registry host"),
])
def test_refused_forms(text, why):
    with pytest.raises(BadReference) as exc:
        reference.parse(text)
    assert why in str(exc.value)


def test_wildcards_and_placeholders():
    ref = reference.parse("https://registry.hub.docker.com/atlas/analysisbase:21.2.1*")
    assert ref.is_wildcard
    expanded = ref.with_tag("21.2.10")
    assert not expanded.is_wildcard
    assert reference.format_template("$(scheme)://x.cern.ch/thin/$(image)", expanded) == \
        "https://x.cern.ch/thin/atlas/analysisbase:21.2.10"
    assert reference.parse("host.io/a:v?").is_wildcard
    assert reference.parse("host.io/a:v[12]").is_wildcard
    pinned = reference.parse(f"ghcr.io/o/i:1@{D}")
    values = pinned.placeholders()
    assert values == {"scheme": "https", "registry": "ghcr.io", "repository": "o/i", "tag": "1",
                      "digest": D, "reference": f":1@{D}", "image": f"o/i:1@{D}"}
    for name, value in values.items():
        assert reference.format_template(f"a/$({name})/$({name})b", pinned) == \
            f"a/{value}/{value}b"
    assert tuple(values) == reference.PLACEHOLDERS
    assert reference.placeholders_in("$(a)/$(tag)") == ["a", "tag"]
    assert pinned.name == f"ghcr.io/o/i:1@{D}"
