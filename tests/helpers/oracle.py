"""Comparing our flat trees with ``umoci unpack --rootless`` of the same image."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

from unpacked.image import sandbox

SANDBOX_FILES = {".singularity.d", "etc/hosts", "etc/resolv.conf", *sandbox.LINKS}


def umoci_rootfs(host: str, repo: str, tag: str, work: Path) -> Path:
    """Fetch with skopeo and unpack with umoci: the independent reference result."""
    from helpers import need
    need("umoci", "skopeo")
    layout, bundle = work / "oci", work / "bundle"
    work.mkdir(parents=True, exist_ok=True)
    for cmd in (["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                 f"docker://{host}/{repo}:{tag}", f"oci:{layout}:{tag}"],
                ["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return bundle / "rootfs"


def describe(root: Path) -> dict[str, tuple]:
    """path -> (type, permission bits, content digest or link target, inode)."""
    out = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, base))
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, None, None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, os.fsdecode(os.readlink(full)), None)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out[rel] = ("file", mode, h.hexdigest(), st.st_ino)
            else:
                out[rel] = ("special", mode, None, None)
    return out


def differences(ours: Path, theirs: Path, specials: set[str] = frozenset()) -> list[str]:
    """Every difference, by path, except the Apptainer additions and skipped special files.

    Modes are compared without the owner bits (we force u+rw / u+rwx, as apptainer
    --fix-perms does) and without set-uid/set-gid (we drop them).
    """
    a, b = describe(ours), describe(theirs)
    problems = []
    for rel in sorted(set(a) | set(b)):
        top = rel.split("/", 1)[0]
        if rel in SANDBOX_FILES or top == ".singularity.d":
            continue
        if rel not in b:
            if rel in sandbox.DIRS or any(d.startswith(rel + "/") for d in sandbox.DIRS):
                continue       # a mount point Apptainer adds
            problems.append(f"{rel}: only in ours")
            continue
        if rel in specials or b[rel][0] == "special":
            if rel in a:
                problems.append(f"{rel}: special file should have been skipped")
            continue
        if rel not in a:
            problems.append(f"{rel}: missing in ours ({b[rel][0]})")
            continue
        problem = _compare(a[rel], b[rel])
        if problem:
            problems.append(f"{rel}: {problem}")
    return problems


def _compare(ours: tuple, theirs: tuple) -> str | None:
    ka, ma, ca, _ = ours
    kb, mb, cb, _ = theirs
    if ka != kb:
        return f"ours is a {ka}, theirs a {kb}"
    if ca != cb:
        return f"content or target differs ({ca} vs {cb})"
    if ma is None:
        return None
    if (ma & 0o1077) != (mb & 0o1077):
        return f"mode {oct(ma)} vs {oct(mb)}"
    if ma & 0o6000:
        return f"set-uid/set-gid kept ({oct(ma)})"
    if ka == "file" and ma & 0o600 != 0o600:
        return f"owner cannot read and write ({oct(ma)})"
    return None


def link_groups(root: Path) -> set[frozenset[str]]:
    """Sets of paths that are hardlinks of one another."""
    by_inode: dict[int, set[str]] = {}
    for rel, (kind, _, _, ino) in describe(root).items():
        if kind == "file":
            by_inode.setdefault(ino, set()).add(rel)
    return {frozenset(g) for g in by_inode.values() if len(g) > 1}
