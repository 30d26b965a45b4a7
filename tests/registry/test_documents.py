"""Registry documents are parsed into typed values at the boundary: every violation is one
line naming the document and the field, never a traceback from deep inside."""

from __future__ import annotations

import json

import pytest

from unpacked.errors import BadDocument
from unpacked.registry import documents as docs

D = "sha256:" + "a" * 64
CFG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 10}
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": 5}
MANIFEST = {"schemaVersion": 2, "mediaType": docs.OCI_MANIFEST, "config": CFG,
            "layers": [LAYER]}
CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
          "rootfs": {"type": "layers", "diff_ids": [D]}}
INDEX = {"schemaVersion": 2, "manifests": [dict(LAYER, mediaType=docs.OCI_MANIFEST,
                                                 platform={"os": "linux",
                                                           "architecture": "amd64"})]}


def spoil(doc: dict, path: str, value) -> bytes:
    """``doc`` with the field at ``path`` (dots; ``-`` deletes) set to ``value``."""
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value == "-":
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return json.dumps(doc).encode()


def manifest(body):
    return docs.parse_manifest(body, docs.OCI_MANIFEST, "manifest X")


def config(body):
    return docs.parse_config(body, "config X")


def index(body):
    return docs.parse_index(body, docs.OCI_INDEX, "index X")


MALFORMED = [
    ("not JSON", manifest, b"<html>oops</html>", "not valid JSON"),
    ("a JSON list", manifest, b"[1, 2]", "not a JSON object"),
    ("NaN", manifest, b'{"schemaVersion": NaN}', "not valid JSON"),
    ("deep nesting", manifest, b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("version as string", manifest, spoil(MANIFEST, "schemaVersion", "2"), "schemaVersion"),
    ("no config", manifest, spoil(MANIFEST, "config", "-"), "config: missing"),
    ("no config digest", manifest, spoil(MANIFEST, "config.digest", "-"), "config.digest"),
    ("escaping digest", manifest, spoil(MANIFEST, "layers.0.digest", "sha256:../../x"),
     "layers[0].digest"),
    ("digest a number", manifest, spoil(MANIFEST, "layers.0.digest", 123), "layers[0].digest"),
    ("size a string", manifest, spoil(MANIFEST, "config.size", "12"), "config.size"),
    ("size negative", manifest, spoil(MANIFEST, "layers.0.size", -1), "layers[0].size"),
    ("size a bool", manifest, spoil(MANIFEST, "layers.0.size", True), "layers[0].size"),
    ("no layer size", manifest, spoil(MANIFEST, "layers.0.size", "-"), "layers[0].size"),
    ("layers not a list", manifest, spoil(MANIFEST, "layers", {"a": 1}), "layers"),
    ("media type a number", manifest, spoil(MANIFEST, "layers.0.mediaType", 5),
     "layers[0].mediaType"),
    ("urls a string", manifest, spoil(MANIFEST, "layers.0.urls", "http://x"), "layers[0].urls"),
    ("url not http", manifest, spoil(MANIFEST, "layers.0.urls", ["file:///etc/passwd"]),
     "layers[0].urls[0]"),
    ("too many layers", manifest, spoil(MANIFEST, "layers", [LAYER] * 1001), "1001 layers"),
    ("no rootfs", config, spoil(CONFIG, "rootfs", "-"), "rootfs: missing"),
    ("diff_id a number", config, spoil(CONFIG, "rootfs.diff_ids", [42]), "rootfs.diff_ids[0]"),
    ("diff_id escaping", config, spoil(CONFIG, "rootfs.diff_ids", ["sha256:../x"]),
     "rootfs.diff_ids[0]"),
    ("Env a string", config, spoil(CONFIG, "config.Env", "A=1"), "config.Env"),
    ("Env holds a number", config, spoil(CONFIG, "config.Env", ["A=1", 2]), "config.Env[1]"),
    ("label not a string", config, spoil(CONFIG, "config.Labels", {"a": 1}), "config.Labels"),
    ("architecture a number", config, spoil(CONFIG, "architecture", 64), "architecture"),
    ("architecture a path", config, spoil(CONFIG, "architecture", "../x"), "architecture"),
    ("platform a string", index, spoil(INDEX, "manifests.0.platform", "linux"),
     "manifests[0].platform"),
    ("index entry digest", index, spoil(INDEX, "manifests.0.digest", "sha256:zz"),
     "manifests[0].digest"),
    ("platform variant a path", index,
     spoil(INDEX, "manifests.0.platform", {"os": "linux", "architecture": "arm",
                                           "variant": "../v7"}), "platform.variant"),
]


@pytest.mark.parametrize("label, parse, body, field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_documents_are_one_line(label, parse, body, field):
    with pytest.raises(BadDocument) as exc:
        parse(body)
    message = str(exc.value)
    assert field in message and "\n" not in message and len(message) < 400, message


def test_good_documents_parse_into_typed_values():
    m = manifest(json.dumps(MANIFEST).encode())
    assert m.config.digest == D and m.layers[0].size == 5 and m.layers[0].urls == ()
    c = config(json.dumps(CONFIG).encode())
    assert c.platform == "linux/amd64" and c.env == ("A=1",) and c.entrypoint is None
    i = index(json.dumps(INDEX).encode())
    assert str(i.manifests[0].platform) == "linux/amd64"


def test_tag_lists_keep_only_grammatical_tags():
    good, bad, count = docs.parse_tag_list(json.dumps({"tags": [
        "1.0", "x/../../../outside", "../up", ".hidden", "a" * 129, "v\x1b[31m", 5, "ok_2"
    ]}).encode(), "tag list")
    assert good == ["1.0", "ok_2"] and count == 8
    assert len(bad) == 6 and not any("\x1b" in b for b in bad)
    with pytest.raises(BadDocument):
        docs.parse_tag_list(b'{"tags": "1.0"}', "tag list")


TOKENS = [
    ("infinite life", b'{"token": "abc", "expires_in": 1e400}', "expires_in"),
    ("life a string", b'{"token": "abc", "expires_in": "60"}', "expires_in"),
    ("CR LF in token", json.dumps({"token": "abc\r\nX-Evil: 1"}).encode(), "token"),
    ("no token", b'{"expires_in": 60}', "token: missing"),
    ("token a number", b'{"token": 5}', "token: missing"),
    ("not JSON", b"token=abc", "not valid JSON"),
    ("huge", json.dumps({"token": "a" * 100_000}).encode(), "larger than"),
]


@pytest.mark.parametrize("label, body, field", TOKENS, ids=[t[0] for t in TOKENS])
def test_odd_token_answers_are_refused(label, body, field):
    with pytest.raises(BadDocument) as exc:
        docs.parse_token(body, "token")
    assert field in str(exc.value)


def test_token_lifetimes_are_bounded():
    assert docs.parse_token(b'{"token": "t", "expires_in": ' + b"1" * 400 + b"}",
                            "token").lifetime == docs.MAX_TOKEN_LIFE
    assert docs.parse_token(b'{"access_token": "t", "expires_in": -5}', "token").lifetime == 1
    assert docs.parse_token(b'{"token": "t"}', "token").lifetime == 60
