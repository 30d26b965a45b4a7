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
        ka, ma, ca, _ = a[rel]
        kb, mb, cb, _ = b[rel]
        if ka != kb:
            problems.append(f"{rel}: ours is a {ka}, theirs a {kb}")
        elif ca != cb:
            problems.append(f"{rel}: content or target differs ({ca} vs {cb})")
        elif ma is not None and (ma & 0o1077) != (mb & 0o1077):
            problems.append(f"{rel}: mode {oct(ma)} vs {oct(mb)}")
        elif ma is not None and ma & 0o6000:
            problems.append(f"{rel}: set-uid/set-gid kept ({oct(ma)})")
        elif ma is not None and ka == "file" and ma & 0o600 != 0o600:
            problems.append(f"{rel}: owner cannot read and write ({oct(ma)})")
    return problems


def link_groups(root: Path) -> set[frozenset[str]]:
    """Sets of paths that are hardlinks of one another."""
    by_inode: dict[int, set[str]] = {}
    for rel, (kind, _, _, ino) in describe(root).items():
        if kind == "file":
            by_inode.setdefault(ino, set()).add(rel)
    return {frozenset(g) for g in by_inode.values() if len(g) > 1}
