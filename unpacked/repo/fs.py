"""The one way anything is written under a repository root: open folders, names inside them.

A ``Dir`` is an open folder (a file descriptor). Every operation names an entry *inside* it,
never a path, so the kernel is never asked to follow a symlink an image placed: folders are
opened one component at a time with ``O_NOFOLLOW``, files are created ``O_EXCL|O_NOFOLLOW``,
links, renames and deletions use the ``*at()`` calls, temporary names are random and created
exclusively, and modes are set explicitly (the caller's umask never leaks into the tree).

A ``guard`` (the publisher's) is asked before every change, so nothing is written outside an
open transaction, not even a folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import UnpackedError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
TEMP_PREFIX = ".tmp-"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

Guard = Callable[[str], None]

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
except (OSError, AttributeError):   # pragma: no cover - glibc < 2.28
    _renameat2 = None


class UnsafePath(UnpackedError):
    """Something under the root is not what the layout says (a symlink where a folder
    belongs, a file where a folder belongs): refused rather than followed."""


def temp_name(label: str = "") -> str:
    """The one way temp names are made: unpredictable, so nobody can plant a symlink there."""
    label = label.replace("/", "_")[:40]
    return f"{TEMP_PREFIX}{label}-{secrets.token_hex(8)}"


def write_local(path: Path | str, data: bytes | str, mode: int = 0o600,
                sync: bool = False) -> None:
    """A file of the tool's own outside the repository (cache/, the spool, status, metrics),
    replaced whole the one way: an unpredictable temp name beside it, made ``O_EXCL`` and
    ``O_NOFOLLOW``, renamed over it (readers see the old file or the new one)."""
    path = Path(path)
    try:
        with Dir.root(path.parent, create=True) as folder:
            folder.write_file(path.name, data.encode() if isinstance(data, str) else data,
                              mode, sync)
            if sync:
                folder.fsync()
    except OSError as exc:          # the file it was for, not a temp name or none at all
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def owner_only(folder: Path) -> None:
    """Make ``folder`` (and its parents) if missing; owner-only when it is ours (what only
    this user may write in: pickles, the resolved state)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.stat(folder).st_uid == os.geteuid():
        os.chmod(folder, 0o700)


def is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def raise_fd_limit(wanted: int = 65536) -> None:
    """Deep trees hold a descriptor per level while being walked: allow plenty."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _gives_folder_group(device: int) -> bool:
    """Whether the filesystem on ``device`` gives new files their folder's group (ext2/3/4 and
    xfs mounted ``grpid``/``bsdgroups``), or we cannot tell."""
    wanted = f"{os.major(device)}:{os.minor(device)}".encode()
    try:
        with open("/proc/self/mountinfo", "rb") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 5 and fields[2] == wanted:
                    options = set(fields[5].split(b",") + fields[-1].split(b","))
                    if options & {b"grpid", b"bsdgroups"}:
                        return True
    except OSError:
        return True
    return False


def process_umask() -> int | None:
    """The umask, read without changing it (``os.umask`` sets it, for every thread)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"refusing the name {name!r}: not a single path component")


def _rename2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


class Dir:
    """An open folder; see the module docstring. Close it (or use ``with``)."""

    __slots__ = ("fd", "path", "guard")

    def __init__(self, fd: int, path: str, guard: Guard | None = None):
        self.fd, self.path, self.guard = fd, path, guard

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def root(cls, path: Path | str, guard: Guard | None = None, create: bool = False) -> Dir:
        """Open a root the operator configured (trusted: it may itself be a symlink)."""
        path = str(path)
        if create and not os.path.isdir(path):
            if guard:
                guard(path)
            os.makedirs(path, mode=0o755, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UnpackedError(f"{path}: no such folder") from None
        except NotADirectoryError:
            raise UnpackedError(f"{path}: not a folder") from None
        return cls(fd, path, guard)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _name_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _changing(self, name: str) -> None:
        _check_name(name)
        if self.guard:
            self.guard(self._name_path(name))

    def child(self, name: str) -> Dir:
        """Open the folder ``name`` inside this one; a symlink or a file there is refused."""
        _check_name(name)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(f"{self._name_path(name)} is not a folder (a symlink or a "
                                 "file); refused") from None
            raise
        return Dir(fd, self._name_path(name), self.guard)

    def sub(self, rel: str, create: bool = False, mode: int = 0o755) -> Dir:
        """Open ``rel`` (``a/b/c``) one folder at a time, making missing ones if asked."""
        current = Dir(os.dup(self.fd), self.path, self.guard)
        try:
            for part in [p for p in rel.split("/") if p]:
                if create and current.lstat(part) is None:
                    with contextlib.suppress(FileExistsError):    # a racing worker made it
                        current.mkdir(part, mode)
                nxt = current.child(part)
                current.close()
                current = nxt
        except BaseException:
            current.close()
            raise
        return current

    # -- looking --------------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        _check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_dir(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def readlink(self, name: str) -> str | None:
        _check_name(name)
        try:
            return os.readlink(name, dir_fd=self.fd)
        except (FileNotFoundError, OSError):
            return None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def scandir(self) -> Iterator[os.DirEntry]:
        with os.scandir(self.fd) as entries:
            yield from entries

    def open_file(self, name: str) -> BinaryIO | None:
        """A regular file opened for reading (never through a symlink), or None."""
        _check_name(name)
        try:
            fd = os.open(name, READ_FILE, dir_fd=self.fd)
        except OSError:
            return None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            return None
        return f

    def read_bytes(self, name: str, limit: int = 1 << 24, head: bool = False) -> bytes | None:
        """A regular file's content (never through a symlink), or None if it is not one;
        None too when it is longer than ``limit``, unless ``head`` asks for its start."""
        _check_name(name)
        try:
            fd = os.open(name, READ_FILE, dir_fd=self.fd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(limit + 1)
        return data[:limit] if head or len(data) <= limit else None

    # -- changing -------------------------------------------------------------------------------

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        self._changing(name)
        os.mkdir(name, 0o700, dir_fd=self.fd)
        os.chmod(name, mode, dir_fd=self.fd)          # explicit: the umask never decides

    def make_temp_dir(self, label: str = "", mode: int = 0o700) -> str:
        """A new folder with an unpredictable name (made exclusively); returns its name."""
        name = temp_name(label)
        self.mkdir(name, mode)
        return name

    def create(self, name: str, mode: int = 0o644, umask: int | None = None) -> int:
        """A new regular file, never through a symlink, never over anything; returns its fd.
        A caller that knows the umask decides alone (``creation_umask``) saves the chmod
        whenever it would not change the mode."""
        self._changing(name)
        if umask is not None and not mode & (umask | 0o7000):
            return os.open(name, NEW_FILE, mode, dir_fd=self.fd)
        fd = os.open(name, NEW_FILE, 0o600, dir_fd=self.fd)
        os.fchmod(fd, mode)
        return fd

    def creation_owner(self) -> tuple[int, int] | None:
        """The owner a file made inside this folder gets, the same for any folder made inside
        it by ``mkdir``/``create`` (their set-gid bit is never set): this process's effective
        ids, or None when the folder did not get them itself (a root-squashing mount) or its
        filesystem gives files their folder's group."""
        st = os.fstat(self.fd)
        owner = (os.geteuid(), os.getegid())
        if (st.st_uid, st.st_gid) != owner or st.st_mode & stat.S_ISGID or \
                _gives_folder_group(st.st_dev):
            return None
        return owner

    def creation_umask(self) -> int | None:
        """The umask that alone decides the mode of a file made in this folder, or None when a
        default ACL here may decide instead (new folders inside inherit it, or its absence)."""
        try:
            os.getxattr(self.fd, "system.posix_acl_default")
            return None
        except OSError as exc:
            if exc.errno != errno.ENODATA:     # no POSIX ACLs here: maybe NFSv4 ones
                return None
        return process_umask()

    def write_file(self, name: str, data: bytes, mode: int = 0o644, sync: bool = False) -> None:
        """Replace ``name`` with a new file holding ``data`` (readers see old or new, whole)."""
        tmp = temp_name(name)
        fd = self.create(tmp, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            self.rename(tmp, self, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def symlink(self, name: str, target: str) -> None:
        """Point ``name`` at ``target`` with one rename: it is never seen missing."""
        self._changing(name)
        tmp = temp_name(name)
        os.symlink(target, tmp, dir_fd=self.fd)
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def new_symlink(self, name: str, target: str) -> None:
        self._changing(name)
        os.symlink(target, name, dir_fd=self.fd)

    def hardlink(self, source: Dir, source_name: str, name: str) -> None:
        """``name`` becomes another name of ``source/source_name`` (a symlink is linked as
        itself, never followed)."""
        self.hardlinks(source, [(source_name, name)])

    def hardlinks(self, source: Dir, names: list[tuple[str, str]]) -> None:
        """``hardlink`` for many (source name, name) pairs of the same two folders."""
        link, src_fd, dst_fd = os.link, source.fd, self.fd
        for source_name, name in names:
            self._changing(name)
            link(source_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)

    def rename(self, name: str, dest: Dir, dest_name: str) -> None:
        self._changing(name)
        dest._changing(dest_name)
        os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def place(self, name: str, dest: Dir, dest_name: str) -> None:
        """Move ``name`` to ``dest/dest_name``, which must not exist."""
        self._changing(name)
        dest._changing(dest_name)
        try:
            _rename2(self.fd, name, dest.fd, dest_name, RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            if dest.lstat(dest_name) is not None:
                raise FileExistsError(errno.EEXIST, "exists", dest_name) from None
            os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def exchange(self, name: str, dest: Dir, dest_name: str) -> None:
        """Swap two entries atomically: the destination is never seen missing."""
        self._changing(name)
        dest._changing(dest_name)
        try:
            _rename2(self.fd, name, dest.fd, dest_name, RENAME_EXCHANGE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            # a filesystem without RENAME_EXCHANGE: two renames, a short window
            aside = temp_name("swap")
            os.rename(dest_name, aside, src_dir_fd=dest.fd, dst_dir_fd=dest.fd)
            os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)
            os.rename(aside, name, src_dir_fd=dest.fd, dst_dir_fd=self.fd)

    def rmdir(self, name: str) -> None:
        """Remove an empty folder (OSError when it is not empty)."""
        self._changing(name)
        os.rmdir(name, dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        self._changing(name)
        os.unlink(name, dir_fd=self.fd)

    def remove(self, name: str) -> bool:
        """Remove a file, a symlink or a whole tree, never following a symlink out of it and
        coping with read-only folders. False when there was nothing."""
        st = self.lstat(name)
        if st is None:
            return False
        self._changing(name)
        try:
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(self.fd, name)
            else:
                os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def chmod(self, name: str, mode: int) -> None:
        """Set a mode without following a symlink (a symlink's own mode means nothing)."""
        self._changing(name)
        st = self.lstat(name)
        if st is None or stat.S_ISLNK(st.st_mode):
            return
        os.chmod(name, mode, dir_fd=self.fd, follow_symlinks=False)

    def chmod_self(self, mode: int) -> None:
        if self.guard:
            self.guard(self.path)
        os.fchmod(self.fd, mode)

    def utime_self(self, ns: tuple[int, int]) -> None:
        if self.guard:
            self.guard(self.path)
        os.utime(self.fd, ns=ns)

    def utime(self, name: str, ns: tuple[int, int]) -> None:
        self._changing(name)
        os.utime(name, ns=ns, dir_fd=self.fd, follow_symlinks=False)

    def chown(self, name: str, uid: int, gid: int) -> None:
        self._changing(name)
        os.chown(name, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    def fsync(self) -> None:
        os.fsync(self.fd)


class FolderCache:
    """Open folders of one tree by relative path, a bounded number kept open (a layer's
    entries come grouped by folder, so nearly every lookup is a hit)."""

    def __init__(self, root: Dir, size: int = 64,
                 on_create: Callable[[str], None] | None = None):
        self.root, self.size, self.on_create = root, size, on_create
        self._open: OrderedDict[str, Dir] = OrderedDict()

    def get(self, rel: str, create: bool = False) -> Dir | None:
        """The folder ``rel`` (made, with its parents, when missing and ``create``), or None
        when missing; UnsafePath when a part of it is not a real folder."""
        if rel == "":
            return self.root
        hit = self._open.get(rel)
        if hit is not None:
            self._open.move_to_end(rel)
            return hit
        parts = rel.split("/")
        depth = len(parts)                   # the deepest folder already open
        while depth > 0 and "/".join(parts[:depth]) not in self._open:
            depth -= 1
        folder = self._open["/".join(parts[:depth])] if depth else self.root
        for i in range(depth, len(parts)):
            folder = self._open_child(folder, "/".join(parts[:i + 1]), parts[i], create)
            if folder is None:
                return None
        return folder

    def _open_child(self, parent: Dir, rel: str, name: str, create: bool) -> Dir | None:
        if parent.lstat(name) is None:
            if not create:
                return None
            with contextlib.suppress(FileExistsError):
                parent.mkdir(name, 0o755)
                if self.on_create:
                    self.on_create(rel)
        folder = parent.child(name)
        self._open[rel] = folder
        if len(self._open) > self.size:
            # forgotten, not closed: a caller may still hold it; the descriptor closes
            # when the last reference goes (CPython's reference counting)
            self._open.popitem(last=False)
        return folder

    def forget(self, rel: str) -> None:
        """``rel`` and what is under it were removed or replaced: forget their descriptors."""
        prefix = rel + "/"
        for key in [k for k in self._open if k == rel or k.startswith(prefix)]:
            del self._open[key]

    def close(self) -> None:
        for folder in self._open.values():
            folder.close()
        self._open.clear()


def _open_for_removal(parent: int, name: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except PermissionError:       # a folder without r/x for us: give the owner access
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=parent)


def _unlink_files(fd: int) -> list[str]:
    """Unlink everything in the open folder but its subfolders, which are returned."""
    subfolders = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except PermissionError:
                os.fchmod(fd, 0o700)
                os.unlink(entry.name, dir_fd=fd)
    return subfolders


def _remove_tree(parent: int, name: str) -> None:
    """Iterative, descriptor-based removal: no recursion limit, no symlink ever followed."""
    raise_fd_limit()
    # each level: (folder fd, its parent fd, its name, subfolders still to remove)
    stack: list[tuple[int, int, str, list[str]]] = []

    def enter(up: int, own: str) -> None:
        try:
            fd = _open_for_removal(up, own)
        except FileNotFoundError:
            return                     # removed meanwhile (a worker cleaning up): fine
        try:
            subfolders = _unlink_files(fd)
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, up, own, subfolders))

    try:
        enter(parent, name)
        while stack:
            fd, up, own, subfolders = stack[-1]
            if subfolders:
                enter(fd, subfolders.pop())
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(own, dir_fd=up)
            except FileNotFoundError:
                pass
            except PermissionError:
                os.fchmod(up, 0o700)
                os.rmdir(own, dir_fd=up)
    finally:
        for fd, *_ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a tree at a path outside any repository (a cache folder, a test's scratch)."""
    parent, name = os.path.split(str(path).rstrip("/"))
    with Dir.root(parent or ".") as folder:
        folder.remove(name)
