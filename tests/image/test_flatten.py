"""Flattening checked against umoci: whiteouts, opaque folders, type swaps, links, odd names."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from helpers import unique
from helpers.images import Entry, Layout, skopeo_copy, tar_bytes
from helpers.oracle import differences, link_groups, umoci_rootfs

from unpacked import reference
from unpacked.image import convert, flatten
from unpacked.repo.fs import Dir
from unpacked.repo.layout import Repository

LONG = "deep/" + "x" * 120 + "/" + "y" * 140
LATIN1 = "caf\udce9"

TRICKY = [
    [Entry("etc", kind="dir"), Entry("etc/passwd", b"root:x:0:0\n"), Entry("etc/group", b"g\n"),
     Entry("etc/secret", b"s", mode=0o400), Entry("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
     Entry("usr/bin/tool2", kind="hardlink", link="usr/bin/tool"),
     Entry("usr/bin/su", b"su", mode=0o4755),
     Entry("usr/bin/abs", kind="symlink", link="/usr/bin/tool"),
     Entry("usr/bin/rel", kind="symlink", link="tool"),
     Entry("dangling", kind="symlink", link="/nowhere/at/all"),
     Entry("var/lib/data/a", b"a"), Entry("var/lib/data/b", b"b"),
     Entry("opt/keep/x", b"x"), Entry("opt/gone/y", b"y"),
     Entry("opt/ro", kind="dir", mode=0o555), Entry("opt/ro/inside", b"i"),
     Entry("home/u", kind="dir", mode=0o700), Entry("tmp", kind="dir", mode=0o1777),
     Entry("swap1/child", b"c"), Entry("swap2", b"file"),
     Entry("link2file", kind="symlink", link="etc"), Entry("file2link", b"f"),
     Entry(LONG, b"long"), Entry(LATIN1, b"latin1"), Entry("pipe", kind="fifo")],
    [Entry("etc/.wh.group", b""), Entry("opt/.wh.gone", b""),
     Entry("var/lib/data/c", b"c"), Entry("var/lib/data/.wh..wh..opq", b""),
     Entry("swap1", b"now a file"), Entry("swap2", kind="dir"),
     Entry("swap2/inner", b"now a folder"),
     Entry("bin2/a", b"shared"), Entry("bin2/b", kind="hardlink", link="bin2/a"),
     Entry("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n"),
     Entry("new/.wh.thing", b""), Entry("new/thing", b"kept: same layer"),
     Entry("link2file", b"was a symlink"),
     Entry("file2link", kind="symlink", link="etc/passwd")],
    [Entry("swap1", kind="dir"), Entry("swap1/z", b"folder again"),
     Entry("opt/keep/x-link", kind="hardlink", link="opt/keep/x"),
     Entry("new/.wh.thing", b""), Entry("usr/bin/.wh.su", b""),
     Entry("/abs/from/umoci-insert", b"leading slash")],
]


def convert_local(client, ref, repo: Repository, mode: str):
    image = client.resolve(ref, ("linux/amd64",)).images[0]
    for layer in image.layers:
        if not repo.has_layer(layer.digest):
            convert.ingest_layer(client, [(ref, layer)], repo)
    convert.build_flat(repo, ref.name, image, mode)
    return image, repo.flat_dir(image.config_digest)


def push(registry, layout: Layout, layers, tag="v1", how="gzip", **kw):
    repo = unique("flat")
    img = layout.image(tag, [tar_bytes(x) for x in layers], how=how, **kw)
    skopeo_copy(layout.path, tag, f"{registry.host}/{repo}:{tag}")
    return repo, img


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_tricky_image_matches_umoci(registry, layout, make_client, tmp_path, mode):
    repo_name, img = push(registry, layout, TRICKY)
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    repo = Repository(tmp_path / "cvmfs")
    _, flat = convert_local(make_client(), ref, repo, mode)
    theirs = umoci_rootfs(registry.host, repo_name, "v1", tmp_path / "umoci")
    assert differences(flat, theirs, specials={"pipe"}) == []
    # spot checks of the rules, so a wrong oracle cannot hide a wrong result
    assert not (flat / "etc/group").exists() and not (flat / "opt/gone").exists()
    assert sorted(os.listdir(flat / "var/lib/data")) == ["c"]
    assert (flat / "swap1/z").read_bytes() == b"folder again"
    assert not (flat / "new/thing").exists()
    assert not (flat / "usr/bin/su").exists()
    assert (flat / "abs/from/umoci-insert").is_file()
    assert os.stat(flat / "opt/keep/x-link").st_ino == os.stat(flat / "opt/keep/x").st_ino
    assert not [p for p in flat.rglob(".wh.*")]
    groups = link_groups(flat)
    assert frozenset({"bin2/a", "bin2/b"}) in groups
    assert frozenset({"usr/bin/tool", "usr/bin/tool2"}) in groups
    if mode == "copy":
        layer_inodes = {p.stat().st_ino for p in (repo.root / ".layers").rglob("*")
                        if p.is_file() and not p.is_symlink()}
        assert not layer_inodes & {p.lstat().st_ino for p in flat.rglob("*") if p.is_file()}


def test_opaque_root(registry, layout, make_client, tmp_path):
    layers = [[Entry("old/a", b"a"), Entry("top", b"t")],
              [Entry(".wh..wh..opq", b""), Entry("fresh", b"f")]]
    repo_name, _ = push(registry, layout, layers)
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    _, flat = convert_local(make_client(), ref, Repository(tmp_path / "cvmfs"), "hardlink")
    theirs = umoci_rootfs(registry.host, repo_name, "v1", tmp_path / "umoci")
    assert differences(flat, theirs) == []
    assert (flat / "fresh").exists() and not (flat / "old").exists()


def test_zstd_image(registry, layout, make_client, tmp_path):
    """umoci 0.4 cannot read zstd layers, so the expected tree is spelt out here."""
    layers = [[Entry("a/x", b"x"), Entry("a/y", b"y")], [Entry("a/.wh.x", b""), Entry("b", b"b")]]
    repo_name, _ = push(registry, layout, layers, how="zstd")
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    _, flat = convert_local(make_client(), ref, Repository(tmp_path / "cvmfs"), "copy")
    assert os.listdir(flat / "a") == ["y"] and (flat / "b").read_bytes() == b"b"


def test_sandbox_changes_never_reach_the_layers(registry, layout, make_client, tmp_path):
    layers = [[Entry("etc/hosts", b"127.0.0.1 image\n"), Entry("etc/resolv.conf", b"ns\n")]]
    repo_name, img = push(registry, layout, layers)
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    repo = Repository(tmp_path / "cvmfs")
    _, flat = convert_local(make_client(), ref, repo, "hardlink")
    assert (flat / "etc/hosts").read_bytes() == b""
    layerfs = repo.layerfs(img.layers[0])
    assert (layerfs / "etc/hosts").read_bytes() == b"127.0.0.1 image\n"
    assert (layerfs / "etc/resolv.conf").read_bytes() == b"ns\n"


def test_plan_writes_each_path_once():
    """Flattening works out the merged tree first: each surviving path appears once."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        layerfs = []
        for i in range(5):
            fs = base / f"l{i}"
            (fs / "shared").mkdir(parents=True)
            (fs / "shared" / "same").write_text(str(i))
            (fs / f"own{i}").write_text(str(i))
            layerfs.append(Dir.root(fs))
        plan = flatten.merge(layerfs, [{}] * 5)
        rels = plan.ordered()
        assert len(rels) == len(set(rels)) == 7
        assert plan.decided["shared/same"][0] == 4
        assert rels.index("shared") < rels.index("shared/same")


def test_many_links_by_several_threads_each_once(tmp_path):
    """Past ``MIN_SHARE`` links per thread, threads share the hardlinks: every file of the
    merged tree is linked once, to the right layer's inode, and a failure in any thread is
    the flattening's."""
    layers = []
    for i in range(2):
        fs = tmp_path / f"l{i}"
        for n in range(flatten.MIN_SHARE * flatten.LINKERS + 500):
            folder = fs / f"d{n % 37}"
            folder.mkdir(parents=True, exist_ok=True)
            if i == 0 or n % 3 == 0:
                (folder / f"f{n}").write_text(f"{i}:{n}")
        layers.append(Dir.root(fs))
    out = tmp_path / "flat"
    out.mkdir()
    with Dir.root(out) as handle:
        stats = flatten.flatten(layers, [{}, {}], handle)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert stats["files"] == len(files) == flatten.MIN_SHARE * flatten.LINKERS + 500
    for path in files:
        n = int(path.name[1:])
        source = tmp_path / ("l1" if n % 3 == 0 else "l0") / path.parent.name / path.name
        assert path.stat().st_ino == source.stat().st_ino, path

    writer = flatten._Writer(layers, Dir.root(tmp_path / "l0"), "hardlink")
    count = flatten.MIN_SHARE * flatten.LINKERS
    ordered = [f"d0/x{n:05}" for n in range(count)]
    decided = {rel: (0, flatten.FILE, "d0/f0") for rel in ordered}
    decided[ordered[-1]] = (0, flatten.FILE, "d0/missing")   # the last thread's share fails
    try:
        with pytest.raises(FileNotFoundError):
            writer._link_all(ordered, decided, count)
    finally:
        writer.close()
    assert (tmp_path / "l0/d0/x00000").exists()          # the first share was linked
    for handle in layers:
        handle.close()


def special_files(raw: bytes) -> set[str]:
    """Devices and fifos of a tar: umoci (rootless) turns them into empty files, we skip them."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name.lstrip("./") for m in tar if m.ischr() or m.isblk() or m.isfifo()}


def test_debootstrap_rootfs_matches_umoci(registry, tmp_path, make_client, bookworm):
    raw = bookworm.read_bytes()
    changes = tar_bytes([Entry("usr/share/.wh.doc", b""), Entry("etc/apt/.wh..wh..opq", b""),
                         Entry("etc/apt/sources.list", b"deb http://deb.debian.org/debian "
                               b"bookworm main\n"), Entry("usr/bin/.wh.perl", b""),
                         Entry("opt/app/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)])
    layout = Layout(tmp_path / "layout")
    layout.image("v1", [raw, changes])
    repo_name = unique("bookworm")
    skopeo_copy(layout.path, "v1", f"{registry.host}/{repo_name}:v1")
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    _, flat = convert_local(make_client(), ref, Repository(tmp_path / "cvmfs"), "hardlink")
    theirs = umoci_rootfs(registry.host, repo_name, "v1", tmp_path / "umoci")
    specials = special_files(raw)
    assert "dev/null" in specials
    problems = differences(flat, theirs, specials)
    assert problems == [], problems[:20]
    assert not (flat / "usr/share/doc").exists() and (flat / "usr/share").is_dir()
    assert os.listdir(flat / "etc/apt") == ["sources.list"]
    assert not os.path.lexists(flat / "usr/bin/perl")
    assert len(list(flat.rglob("*"))) > 5000


LINKS = [
    [Entry("a", b"A0"), Entry("b", b"B0"), Entry("over", b"lower file"), Entry("d/x", b"X0")],
    [Entry("gone", kind="hardlink", link="a"), Entry("over", kind="hardlink", link="a"),
     Entry("keep", kind="hardlink", link="b"), Entry("d/y", kind="hardlink", link="d/x")],
    [Entry(".wh.gone", b""), Entry("b", b"B2, replaced later")],
]


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_cross_layer_hardlinks_take_their_layers_view(registry, layout, make_client, tmp_path,
                                                      mode):
    """A hardlink to a lower layer is its target as the layers below it had it: a later
    whiteout removes it, it replaces a lower file at its path, a later change of its target
    does not reach it (as umoci applies layers)."""
    repo_name, _ = push(registry, layout, LINKS)
    ref = reference.parse(f"http://{registry.host}/{repo_name}:v1")
    _, flat = convert_local(make_client(), ref, Repository(tmp_path / "cvmfs"), mode)
    theirs = umoci_rootfs(registry.host, repo_name, "v1", tmp_path / "umoci")
    assert differences(flat, theirs) == []
    assert not os.path.lexists(flat / "gone")
    assert (flat / "over").read_bytes() == b"A0"
    assert (flat / "keep").read_bytes() == b"B0" and (flat / "b").read_bytes() == b"B2, " \
        b"replaced later"
    assert os.stat(flat / "over").st_ino == os.stat(flat / "a").st_ino
    assert os.stat(flat / "d/y").st_ino == os.stat(flat / "d/x").st_ino
