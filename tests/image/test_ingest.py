"""Layer ingest: hostile tars are refused naming the entry; legit oddities survive exactly."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile

import pytest
import zstandard
from helpers.images import Entry, tar_bytes

from unpacked.image import ingest as layers
from unpacked.image.ingest import Claims, LayerError
from unpacked.repo.layout import Repository


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def site(tmp_path):
    """A repository root with canaries beside and outside the layer's target."""
    root = tmp_path / "repo"
    (root / ".layers").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    (root / ".layers" / "canary").write_text("untouched")
    return root, outside


def run(site, raw: bytes, *, how="gzip", diff_id=None, media=None, max_bytes=1 << 30):
    root, _ = site
    data = {"gzip": lambda b: gzip.compress(b, mtime=0),
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
            "tar": lambda b: b}[how](raw)
    media = media or {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                      "tar": "application/vnd.oci.image.layer.v1.tar"}[how]
    dest = root / ".layers" / sha(data)[7:]
    claims = Claims(sha(data), (diff_id or sha(raw),), media, len(data))
    info = layers.ingest(io.BytesIO(data), Repository(root), claims, max_bytes=max_bytes)
    return dest, info


def assert_clean(site):
    root, outside = site
    assert (outside / "canary").read_text() == "untouched"
    assert (root / ".layers" / "canary").read_text() == "untouched"
    assert sorted(os.listdir(outside)) == ["canary"]
    assert sorted(os.listdir(root / ".layers")) == ["canary"], "partial layer left behind"
    assert sorted(os.listdir(root)) == [".layers"]


HOSTILE = [
    ("dotdot", lambda o: [Entry("../evil", b"x")], "'../evil'", "climbs out"),
    ("dotdot inside", lambda o: [Entry("a/../../evil", b"x")], "climbs out", "'a/../../evil'"),
    ("symlink to root then file", lambda o: [Entry("link", kind="symlink", link="/"),
                                             Entry("link/etc/evil", b"x")],
     "'link/etc/evil'", "parent 'link' is a symlink"),
    ("symlink to outside then file", lambda o: [Entry("out", kind="symlink", link=str(o)),
                                                Entry("out/canary", b"pwned")],
     "'out/canary'", "symlink"),
    ("symlink chain", lambda o: [Entry("a", kind="symlink", link="b"),
                                 Entry("b", kind="symlink", link="../../../.."),
                                 Entry("a/evil", b"x")], "'a/evil'", "symlink"),
    ("hardlink outside", lambda o: [Entry("h", kind="hardlink", link="../../outside/canary")],
     "'h'", "outside the layer"),
    ("hardlink through symlink", lambda o: [Entry("s", kind="symlink", link=str(o)),
                                            Entry("h", kind="hardlink", link="s/canary")],
     "'h'", "through 's'"),
    ("whiteout with empty name", lambda o: [Entry("dir/.wh.", b"")], "'dir/.wh.'",
     "empty name"),
    ("root becomes a file", lambda o: [Entry("./", b"x")], "'./'", "root folder"),
    ("folder made a hardlink", lambda o: [Entry("d", kind="dir"),
                                          Entry("h", kind="hardlink", link="d")],
     "'h'", "folder"),
    ("hardlink target too long", lambda o: [Entry("h", kind="hardlink",
                                                  link="/".join(["x" * 250] * 20))],
     "'h'", "longer or deeper than any real path"),
    ("hardlink target too deep", lambda o: [Entry("h", kind="hardlink", link="a/" * 2000 + "b")],
     "'h'", "longer or deeper than any real path"),
    ("owner out of range", lambda o: [Entry("f", b"x", pax={"uid": str(1 << 33)})],
     "'f'", "owner"),
]


@pytest.mark.parametrize("label, entries, names, why", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_entries_are_refused(site, label, entries, names, why):
    _, outside = site
    raw = tar_bytes(entries(outside))
    if names is None:
        # Not refused: the hardlink's target was never created (the parent is a symlink), so
        # it is left for flattening, which only links inside the merged tree.
        dest, info = run(site, raw)
        assert info["external_links"] == {"h": "s/canary"}
        assert not os.path.lexists(dest / "layerfs" / "h")
        assert (outside / "canary").read_text() == "untouched"
        return
    with pytest.raises(LayerError) as exc:
        run(site, raw)
    message = str(exc.value)
    assert names in message and why in message and "\n" not in message
    assert_clean(site)


def test_odd_metadata_is_read_or_refused_in_one_line(site, caplog):
    """An absurd mtime is today; a name with a newline works; a name that would forge a log
    line is logged sanitised."""
    forged = "evil\n2099-01-01T00:00:00+00:00 unpacked: 0 added\x1b[2J"
    raw = tar_bytes([Entry("t", b"x", pax={"mtime": "1e300"}), Entry("line\nbreak/f", b"y"),
                     Entry(forged, kind="fifo")])
    dest, info = run(site, raw)
    fs = dest / "layerfs"
    assert (fs / "t").read_bytes() == b"x" and (fs / "line\nbreak" / "f").read_bytes() == b"y"
    assert info["skipped"] == [f"{forged} (fifo)"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in logged and "\n2099" not in logged and "evil" in logged


def test_gnu_sparse_maps_are_bounded(site):
    """GNU's old sparse format chains extension blocks of 21 regions: a tiny blob can claim
    millions of them; it is refused before they are read."""
    import tarfile as tf
    header = bytearray(tf.TarInfo("holes").tobuf(format=tf.GNU_FORMAT))
    header[156:157] = b"S"
    header[482] = 1                                  # extended: more regions follow
    header[483:495] = b"%011o\0" % (1 << 30)          # the real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    block = bytearray(512)
    for pos in range(0, 21 * 24, 24):
        block[pos:pos + 24] = b"%011o\0%011o\0" % (pos * 512 + 512, 1)
    block[504] = 1
    raw = bytes(header[:512]) + bytes(block) * 1000 + bytes(1024)
    with pytest.raises(LayerError, match="sparse file of more than"):
        run(site, raw, diff_id=sha(raw))
    assert_clean(site)


def test_hardlink_to_escaping_symlink_never_follows(site):
    _, outside = site
    raw = tar_bytes([Entry("s", kind="symlink", link=str(outside / "canary")),
                     Entry("h", kind="hardlink", link="s"),
                     Entry("h", b"pwned")])
    dest, info = run(site, raw)
    fs = dest / "layerfs"
    assert os.readlink(fs / "s") == str(outside / "canary")
    assert (fs / "h").read_bytes() == b"pwned" and not os.path.islink(fs / "h")
    assert info["duplicates"] == ["h"]
    assert (outside / "canary").read_text() == "untouched"


def test_special_files_skipped_and_setid_dropped(site):
    raw = tar_bytes([Entry("dev", kind="dir"), Entry("dev/null", kind="char"),
                     Entry("dev/sda", kind="block"), Entry("pipe", kind="fifo"),
                     Entry("bin/su", b"#!", mode=0o4755), Entry("bin/wall", b"#!", mode=0o2755),
                     Entry("tmp", kind="dir", mode=0o1777)])
    dest, info = run(site, raw)
    fs = dest / "layerfs"
    assert sorted(info["skipped"]) == ["dev/null (device)", "dev/sda (device)", "pipe (fifo)"]
    assert not os.path.lexists(fs / "dev/null") and not os.path.lexists(fs / "pipe")
    assert stat.S_IMODE(os.stat(fs / "bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(fs / "bin/wall").st_mode) == 0o755
    assert sorted(info["dropped_setid"]) == ["bin/su", "bin/wall"]
    assert stat.S_IMODE(os.stat(fs / "tmp").st_mode) == 0o1777
    saved = json.loads((dest / "layer.json").read_text())
    assert saved["skipped"] == info["skipped"]


def test_duplicates_later_wins_and_whiteouts_stay(site):
    raw = tar_bytes([Entry("a", b"first"), Entry("a", b"second"),
                     Entry("d", kind="dir"), Entry("d/x", b"x"), Entry("d", b"now a file"),
                     Entry(".wh..wh..opq", b""), Entry("etc/.wh.passwd", b""),
                     Entry("etc/.wh..wh..opq", b"")])
    dest, info = run(site, raw)
    fs = dest / "layerfs"
    assert (fs / "a").read_bytes() == b"second"
    assert (fs / "d").read_bytes() == b"now a file"
    for name in (".wh..wh..opq", "etc/.wh.passwd", "etc/.wh..wh..opq"):
        assert (fs / name).is_file() and (fs / name).stat().st_size == 0


def test_owner_bits_forced_so_the_tree_can_be_removed(site):
    raw = tar_bytes([Entry("locked", kind="dir", mode=0o000), Entry("locked/f", b"x", mode=0),
                     Entry("ro", kind="dir", mode=0o555)])
    dest, _ = run(site, raw)
    fs = dest / "layerfs"
    assert stat.S_IMODE(os.stat(fs / "locked").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(fs / "locked/f").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(fs / "ro").st_mode) == 0o755


def test_decompression_bomb_refused(site):
    raw = tar_bytes([Entry("zeros", bytes(4 << 20))])
    with pytest.raises(LayerError, match="decompression bomb"):
        run(site, raw, max_bytes=1 << 20)
    assert_clean(site)


def test_truncated_tar_names_the_entry(site):
    raw = tar_bytes([Entry("small", b"ok"), Entry("big", os.urandom(200_000))])
    cut = raw[:len(raw) // 2]
    with pytest.raises(LayerError) as exc:
        run(site, cut, how="tar", diff_id=sha(raw))
    assert "truncated" in str(exc.value) and "'big'" in str(exc.value)
    assert_clean(site)


def test_wrong_diff_id_refused(site):
    raw = tar_bytes([Entry("a", b"a")])
    with pytest.raises(LayerError) as exc:
        run(site, raw, diff_id="sha256:" + "0" * 64)
    assert "diff_id sha256:000" in str(exc.value)
    assert_clean(site)


@pytest.mark.parametrize("how", ["gzip", "zstd", "tar"])
def test_compressions(site, how):
    raw = tar_bytes([Entry("f", b"content " * 1000)])
    dest, info = run(site, raw, how=how)
    assert (dest / "layerfs/f").read_bytes() == b"content " * 1000
    assert info["compression"] == how
    assert info["uncompressed_size"] == len(raw)


def test_media_type_and_content_disagree(site, caplog):
    raw = tar_bytes([Entry("f", b"x")])
    dest, info = run(site, raw, how="gzip", media="application/vnd.oci.image.layer.v1.tar")
    assert info["compression"] == "gzip" and (dest / "layerfs/f").read_bytes() == b"x"
    assert "media type says tar but the content is gzip" in caplog.text


def test_trailing_padding_after_archive(site):
    raw = tar_bytes([Entry("f", b"x")]) + bytes(10240)
    dest, _ = run(site, raw)
    assert (dest / "layerfs/f").read_bytes() == b"x"


def test_names_modes_times_links_survive(site, tmp_path):
    long = "d" * 60 + "/" + "n" * 150
    latin1 = "caf\udce9"          # the byte 0xE9: not UTF-8
    entries = [Entry(long, b"long"), Entry(latin1, b"latin1"), Entry("empty", kind="dir"),
               Entry("abs", kind="symlink", link="/usr/bin/env"),
               Entry("rel", kind="symlink", link="../x/y"),
               Entry("dangling", kind="symlink", link="nowhere"),
               Entry("a/file", b"shared", mtime=1_234_567_890, mode=0o640),
               Entry("a/link", kind="hardlink", link="a/file"),
               Entry("/etc/abs-name", b"leading slash stripped")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        raw = tar_bytes(entries, fmt=fmt)
        dest, _ = run(site, raw)
        fs = dest / "layerfs"
        assert (fs / long).read_bytes() == b"long"
        assert (fs / os.fsdecode(b"caf\xe9")).read_bytes() == b"latin1"
        assert b"caf\xe9" in os.listdir(os.fsencode(fs))
        assert (fs / "empty").is_dir() and not os.listdir(fs / "empty")
        assert os.readlink(fs / "abs") == "/usr/bin/env"
        assert os.readlink(fs / "rel") == "../x/y"
        assert os.readlink(fs / "dangling") == "nowhere"
        st = os.stat(fs / "a/file")
        assert st.st_mtime == 1_234_567_890 and stat.S_IMODE(st.st_mode) == 0o640
        assert os.stat(fs / "a/link").st_ino == st.st_ino
        assert (fs / "etc/abs-name").is_file()
        assert os.lstat(fs / "empty").st_mtime == 1_600_000_000


def test_sparse_file_from_gnu_tar(site, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle")
    for args in (["--format=gnu"], ["--format=posix", "--sparse-version=0.0"],
                 ["--format=posix", "--sparse-version=0.1"],
                 ["--format=posix", "--sparse-version=1.0"]):
        raw = subprocess.run(["tar", *args, "--sparse", "-C", str(src), "-cf", "-",
                              "sparse"], check=True, capture_output=True).stdout
        dest, info = run(site, raw)
        made = dest / "layerfs/sparse"
        assert made.read_bytes() == (src / "sparse").read_bytes(), args
        assert os.stat(made).st_blocks * 512 < 1 << 20, "the holes were written out"
        assert info["written"] == 5 << 20 | 3


def test_a_nul_byte_in_a_pax_name_is_refused(site):
    raw = tar_bytes([Entry("a", b"1", pax={"path": "etc/pass\0wd"})])
    with pytest.raises(LayerError, match="a NUL byte in its name"):
        run(site, raw)
    assert_clean(site)


def test_a_full_disk_names_the_entry_and_leaves_nothing(tmp_path):
    """A write that fails is the layer's failure, named by its entry, with every descriptor
    closed and nothing left behind."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        (disk / ".layers").mkdir()
        raw = tar_bytes([Entry(f"d/f{n:03}", os.urandom(20_000)) for n in range(120)])
        data = gzip.compress(raw, mtime=0)
        claims = Claims(sha(data), (sha(raw),), "application/vnd.oci.image.layer.v1.tar+gzip",
                        len(data))
        open_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(LayerError) as exc:
            layers.ingest(io.BytesIO(data), Repository(disk), claims)
        assert "No space left on device" in str(exc.value)
        assert "entry 'd/f" in str(exc.value)
        assert len(os.listdir("/proc/self/fd")) == open_before
        assert os.listdir(disk / ".layers") == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


MODES = {"a": 0o644, "b": 0o755, "c": 0o600, "d": 0o666, "e": 0o1755, "f": 0o000}


def assert_modes(dest) -> None:
    made = {name: stat.S_IMODE(os.lstat(dest / "layerfs" / name).st_mode) for name in MODES}
    assert made == {name: mode | 0o600 for name, mode in MODES.items()}


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022])
def test_file_modes_are_the_entries_whatever_the_umask(site, umask):
    """The umask never decides (files are made with their mode only when it cannot)."""
    raw = tar_bytes([Entry(name, b"x", mode=mode) for name, mode in MODES.items()])
    old = os.umask(umask)
    try:
        dest, _ = run(site, raw)
    finally:
        os.umask(old)
    assert_modes(dest)


def test_file_modes_are_the_entries_under_a_default_acl(site):
    """A default ACL (other::---) decides new files' modes instead of the umask."""
    root, _ = site
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((1, 7), (4, 5), (0x20, 0)))
    try:
        os.setxattr(root / ".layers", "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no ACLs here: {exc}")
    probe = root / ".layers" / "probe"
    os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
    assert stat.S_IMODE(os.stat(probe).st_mode) == 0o640, "the ACL does not apply"
    probe.unlink()
    dest, _ = run(site, tar_bytes([Entry(name, b"x", mode=mode) for name, mode in MODES.items()]))
    assert_modes(dest)


@pytest.mark.parametrize("options", ["grpid", "nogrpid"])
def test_owners_are_the_entries_on_a_filesystem_giving_folder_groups(tmp_path, options):
    """Files are chowned only when their owner would differ from the one they are made with;
    on a filesystem mounted ``grpid`` a new file takes its folder's group, so every file is."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted filesystem")
    image, disk = tmp_path / "fs.img", tmp_path / "disk"
    disk.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-o", f"loop,{options}", str(image), str(disk)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"no loop mount here: {mounted.stderr.decode()[:200]}")
    try:
        (disk / ".layers").mkdir()
        raw = tar_bytes([Entry("d", kind="dir", uid=1234, gid=4321),
                         Entry("d/root-file", b"r"), Entry("d/owned", b"o", uid=7, gid=8),
                         Entry("top", b"t")])
        claims = Claims(sha(raw), (sha(raw),), "application/vnd.oci.image.layer.v1.tar",
                        len(raw))
        layers.ingest(io.BytesIO(raw), Repository(disk), claims)
        fs = disk / ".layers" / sha(raw)[7:] / "layerfs"
        owners = {name: (os.lstat(fs / name).st_uid, os.lstat(fs / name).st_gid)
                  for name in ("d", "d/root-file", "d/owned", "top")}
        assert owners == {"d": (1234, 4321), "d/root-file": (0, 0), "d/owned": (7, 8),
                          "top": (0, 0)}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_reingest_replaces_whole(site):
    raw = tar_bytes([Entry("f", b"1")])
    dest, _ = run(site, raw)
    (dest / "layerfs/f").write_bytes(b"tampered")
    dest, _ = run(site, raw)
    assert (dest / "layerfs/f").read_bytes() == b"1"
    assert [n for n in os.listdir(dest.parent) if n.startswith(".")] == []


def test_foreign_layer_needs_the_setting(tmp_path):
    """A non-distributable layer is fetched from its own urls only when allowed, verified."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from unpacked import reference
    from unpacked.errors import UnpackedError
    from unpacked.image import convert
    from unpacked.registry.client import RegistryClient
    from unpacked.registry.resolved import Layer
    from unpacked.repo.layout import Repository

    raw = tar_bytes([Entry("Windows/foreign.txt", b"from elsewhere")])
    data = gzip.compress(raw, mtime=0)
    served = tmp_path / "served"
    served.mkdir()
    (served / "layer.tar.gz").write_bytes(data)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/layer.tar.gz"
        layer = Layer(sha(data), len(data),
                      "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", sha(raw),
                      (url,))
        ref = reference.parse("http://127.0.0.1:1/never/contacted:1")
        repo = Repository(tmp_path / "repo")
        client = RegistryClient(None)
        with pytest.raises(UnpackedError) as exc:
            convert.ingest_layer(client, [(ref, layer)], repo)
        assert "foreign layer" in str(exc.value) and "foreign_layers=1" in str(exc.value)
        assert url in str(exc.value)
        convert.ingest_layer(client, [(ref, layer)], repo, convert.Options(foreign=True))
        assert (repo.layerfs(layer.digest) / "Windows/foreign.txt").read_bytes() == \
            b"from elsewhere"
        bad = Layer("sha256:" + "0" * 64, len(data), layer.media_type, sha(raw), (url,))
        with pytest.raises(UnpackedError, match="hashes to"):
            convert.ingest_layer(client, [(ref, bad)], repo, convert.Options(foreign=True))
        assert not repo.layer_dir(bad.digest).exists()
    finally:
        server.shutdown()


def test_ownership_kept_as_root(site):
    raw = tar_bytes([Entry("owned", b"x", uid=1234, gid=5678),
                     Entry("dir", kind="dir", uid=42, gid=43),
                     Entry("link", kind="symlink", link="owned", uid=7, gid=8)])
    dest, _ = run(site, raw)
    fs = dest / "layerfs"
    if os.geteuid() != 0:
        assert os.stat(fs / "owned").st_uid == os.geteuid()
        return
    assert (os.stat(fs / "owned").st_uid, os.stat(fs / "owned").st_gid) == (1234, 5678)
    assert (os.stat(fs / "dir").st_uid, os.stat(fs / "dir").st_gid) == (42, 43)
    assert (os.lstat(fs / "link").st_uid, os.lstat(fs / "link").st_gid) == (7, 8)


def test_write_all_finishes_a_write_a_signal_cut_short():
    """A write interrupted by a signal after part of its bytes returns that part; the rest
    must still be written (a file object's ``write`` would have dropped it)."""
    import signal
    import threading
    import time

    from unpacked.image.ingest import write_all
    data = os.urandom(8 << 20)
    read_end, write_end = os.pipe()
    got = bytearray()

    def drain():
        while chunk := os.read(read_end, 4096):
            got.extend(chunk)
            time.sleep(0.0002)
    reader = threading.Thread(target=drain)
    reader.start()
    old = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        write_all(write_end, data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(write_end)
    reader.join()
    os.close(read_end)
    assert bytes(got) == data
