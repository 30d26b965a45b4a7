"""Publishers: one CVMFS transaction per run, behind one small interface.

``CvmfsPublisher`` drives ``cvmfs_server transaction / publish / abort -f``. ``LocalPublisher``
keeps the same semantics for a plain folder: a journal of the open transaction, abort puts
back what the run replaced and removes what it added, publish records a revision and time.
A marker in ``cache/`` says that *we* opened a transaction, so a crashed run's transaction is
aborted at the next start while one held by another program is reported, never stolen.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from ..errors import UnpackedError
from .fs import remove_tree, write_atomic
from .layout import Repository

log = logging.getLogger(__name__)


class TransactionError(UnpackedError):
    """A transaction could not be opened, published or aborted."""


class Publisher:
    """One repository's transaction; state lives on disk so any process of a run can use it."""

    kind = "base"

    def __init__(self, name: str, root: Path, cache_dir: Path):
        self.name = name
        self.root = root
        self.leftovers: list[str] = []     # what the last publish could not clean up
        self.marker = cache_dir / "transactions" / f"{name}.json"

    # -- the interface ------------------------------------------------------------------------

    def is_open(self) -> bool:
        return self.marker.exists()

    def begin(self) -> None:
        """Open the transaction unless this run already has (idempotent within a run)."""
        if self.is_open():
            return
        self._open()
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker, json.dumps({"pid": os.getpid(), "started": time.time(),
                                              "repository": self.name}).encode(), 0o600)
        log.info("%s: transaction opened", self.name)

    def publish(self, message: str) -> None:
        if not self.is_open():
            return
        self._publish(message)
        self.marker.unlink(missing_ok=True)
        log.info("%s: published (%s)", self.name, message)

    def abort(self) -> None:
        if not self.is_open():
            return
        self._abort()
        self.marker.unlink(missing_ok=True)
        log.warning("%s: transaction aborted", self.name)

    def recover(self) -> bool:
        """At the start of a run (the run lock held): abort what a crashed run left open."""
        if self.is_open():
            try:
                who = json.loads(self.marker.read_text()).get("pid")
            except (OSError, ValueError):
                who = "?"
            log.warning("%s: aborting the transaction left open by an interrupted run (pid %s)",
                        self.name, who)
            self.abort()
            return True
        self._check_foreign()
        return False

    def repository(self) -> Repository:
        raise NotImplementedError

    # -- what each kind does ------------------------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _publish(self, message: str) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _check_foreign(self) -> None:
        """Raise if somebody else holds a transaction on this repository."""

    def before_replace(self, final: Path) -> None:
        """Called before anything is put at ``final`` inside the repository."""


class LocalPublisher(Publisher):
    """A plain folder with transaction semantics (journal, abort, revision)."""

    kind = "local"

    def __init__(self, name: str, root: Path, cache_dir: Path):
        super().__init__(name, root, cache_dir)
        self.meta = root / ".unpacked"
        self.journal = self.meta / "journal.jsonl"
        self.backups = self.meta / "backup"

    def repository(self) -> Repository:
        return Repository(self.root, catalogs=False, guard=self.before_replace)

    def is_open(self) -> bool:
        # a journal without its marker: a crashed run whose cache/ was lost since
        return super().is_open() or self.journal.exists()

    def _open(self) -> None:
        self.backups.mkdir(parents=True, exist_ok=True)
        self.journal.touch()

    def before_replace(self, final: Path) -> None:
        if not self.is_open():
            raise TransactionError(f"{self.name}: write to {final} outside a transaction")
        entry: dict = {"path": str(final), "backup": None}
        if os.path.lexists(final):
            backup = self.backups / f"{time.time_ns()}-{os.getpid()}-{final.name}"
            os.rename(final, backup)
            entry["backup"] = str(backup)
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _entries(self) -> list[dict]:
        try:
            lines = self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue        # a line cut by a crash: its rename had not happened yet
        return entries

    def _publish(self, message: str) -> None:
        self.leftovers = self._drop_backups()
        self.journal.unlink(missing_ok=True)
        state = self.meta / "published.json"
        try:
            revision = json.loads(state.read_text()).get("revision", 0)
        except (OSError, ValueError):
            revision = 0
        write_atomic(state, json.dumps({"revision": revision + 1, "time": time.time(),
                                        "message": message}).encode())

    def _drop_backups(self) -> list[str]:
        """What the transaction replaced or deleted goes now; what resists is reported and
        stays in ``.unpacked/backup`` for the next publish to retry."""
        leftovers = []
        if not self.backups.is_dir():
            return leftovers
        for entry in os.scandir(self.backups):
            try:
                remove_tree(Path(entry.path))
            except OSError as exc:
                leftovers.append(f"could not delete {entry.path}: {exc.strerror or exc}")
                log.error("%s: %s", self.name, leftovers[-1])
        return leftovers

    def _abort(self) -> None:
        for entry in reversed(self._entries()):
            final = Path(entry["path"])
            remove_tree(final)
            if entry.get("backup") and os.path.lexists(entry["backup"]):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(entry["backup"], final)
        self._drop_backups()
        self.journal.unlink(missing_ok=True)
        self.clean()

    def clean(self) -> None:
        Repository(self.root).clean_temps()

    def revision(self) -> int:
        try:
            return json.loads((self.meta / "published.json").read_text()).get("revision", 0)
        except (OSError, ValueError):
            return 0


class CvmfsPublisher(Publisher):
    """The real thing: ``cvmfs_server`` on a release-manager machine."""

    kind = "cvmfs"

    def __init__(self, name: str, root: Path, cache_dir: Path, command: str = "cvmfs_server",
                 spool: Path = Path("/var/spool/cvmfs")):
        super().__init__(name, root, cache_dir)
        self.command = command
        self.spool = spool

    def repository(self) -> Repository:
        return Repository(self.root, catalogs=True, guard=self.before_replace)

    def _run(self, *args: str) -> None:
        argv = [self.command, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=6 * 3600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransactionError(f"{' '.join(argv)}: {exc}") from None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise TransactionError(f"{' '.join(argv)} failed ({done.returncode}): "
                                   f"{said[-1] if said else 'no message'}")

    def _open(self) -> None:
        self._run("transaction", self.name)

    def _publish(self, message: str) -> None:
        try:
            self._run("publish", "-m", message, self.name)
        except TransactionError:
            log.error("%s: publish failed, aborting the transaction", self.name)
            self._run("abort", "-f", self.name)
            raise

    def _abort(self) -> None:
        self._run("abort", "-f", self.name)

    def _check_foreign(self) -> None:
        lock = self.spool / self.name / "in_transaction.lock"
        if lock.exists():
            raise TransactionError(f"{self.name} is in a transaction that this tool did not "
                                   f"open ({lock} exists); not touching it")

    def before_replace(self, final: Path) -> None:
        if not self.is_open():
            raise TransactionError(f"{self.name}: write to {final} outside a transaction")


def make(name: str, settings) -> Publisher:
    """The publisher the settings ask for, for repository ``name``."""
    root = settings.repo_root / name
    if settings.publisher == "cvmfs":
        return CvmfsPublisher(name, root, settings.cache_dir, settings.cvmfs_server,
                              settings.cvmfs_spool)
    return LocalPublisher(name, root, settings.cache_dir)
