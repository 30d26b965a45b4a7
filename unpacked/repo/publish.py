"""Publishers: one CVMFS transaction per run, behind one small interface.

``CvmfsPublisher`` drives ``cvmfs_server transaction / publish / abort -f``; its marker in the
repository's spool folder is written *before* the transaction is asked for, so a crash at any
moment leaves a transaction the next run knows as its own (and aborts), while one opened by
another program is reported and never touched. ``LocalPublisher`` gives a plain folder the
same semantics with a write-ahead journal (``journal.py``).

Publish and abort run with SIGINT/SIGTERM deferred and ``cvmfs_server`` in its own session:
an impatient Ctrl-C or a cron timeout never cuts a publish in half.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from ..errors import Busy, UnpackedError, sanitize
from . import crash
from .fs import write_local
from .journal import Journal
from .layout import STATE, Repository, Writer
from .lock import Lock

log = logging.getLogger(__name__)


class TransactionError(UnpackedError):
    """A transaction could not be opened, published or aborted."""


@contextlib.contextmanager
def signals_deferred():
    """SIGINT/SIGTERM arriving inside the block are delivered when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


class Publisher:
    """One repository's transaction; its state lives on disk so any process of a run can
    use it."""

    kind = "base"

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root

    def repository(self) -> Repository:
        raise NotImplementedError

    def lock(self) -> Lock:
        raise NotImplementedError

    def is_open(self) -> bool:
        raise NotImplementedError

    def closing(self) -> int | None:
        """The process inside a step that must not be cut (open, publish), if any."""
        return None

    def settled(self) -> bool:
        """No transaction of any kind (ours or another's, opening or closing) is under way."""
        return not self.is_open()

    def check(self, path: str) -> None:
        """The guard of every write under the root: only inside our open transaction."""
        if not self.is_open():
            raise TransactionError(f"{self.name}: no open transaction; {path} not written")

    def begin(self) -> None:
        """Open the transaction unless this run already has (idempotent within a run)."""
        raise NotImplementedError

    def publish(self, message: str) -> list[str]:
        """Publish; returns what could not be cleaned up (reported, retried later)."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def recover(self) -> str | None:
        """At the start of a run (its locks held): deal with what a crashed run left."""
        raise NotImplementedError

    def revision(self) -> int:
        return 0


class LocalPublisher(Publisher):
    """A plain folder with transaction semantics (write-ahead journal, abort, revision)."""

    kind = "local"

    def __init__(self, name: str, root: Path):
        super().__init__(name, root)
        self.journal = Journal(root)

    def repository(self) -> Repository:
        return Repository(self.root, catalogs=False, writer=self.journal.writer(self.check))

    def lock(self) -> Lock:
        return Lock(self.root / STATE / "lock", f"repository {self.name}")

    def is_open(self) -> bool:
        return self.journal.is_open()

    def begin(self) -> None:
        if self.is_open():
            return
        self.journal.open()
        log.info("%s: transaction opened", self.name)

    def publish(self, message: str) -> list[str]:
        if not self.is_open():
            return []
        with signals_deferred():
            txn = self.journal.txn()
            if txn and self.journal.published().get("txn") == txn:
                leftovers = self.journal.finish()          # already recorded: clean up
            else:
                leftovers = self.journal.publish(message)
        for line in leftovers:
            log.error("%s: %s", self.name, line)
        log.info("%s: published (%s)", self.name, message)
        return leftovers

    def abort(self) -> None:
        if not self.is_open():
            return
        with signals_deferred():
            self.journal.abort(self._clean)
        log.warning("%s: transaction aborted", self.name)

    def _clean(self) -> None:
        self.repository().clean_temps()

    def recover(self) -> str | None:
        if self.journal.is_open():
            log.warning("%s: aborting the transaction left open by an interrupted run (or "
                        "finishing its recorded publish)", self.name)
        with signals_deferred():
            done = self.journal.recover(self._clean)
        if done == "finished":
            log.warning("%s: finished the publish an interrupted run had recorded", self.name)
        return done

    def revision(self) -> int:
        return self.journal.revision()


class CvmfsPublisher(Publisher):
    """The real thing: ``cvmfs_server`` on a release-manager machine."""

    kind = "cvmfs"

    def __init__(self, name: str, root: Path, command: str = "cvmfs_server",
                 spool: Path = Path("/var/spool/cvmfs")):
        super().__init__(name, root)
        self.command = command
        self.spool = spool / name
        self.marker = self.spool / "unpacked-transaction.json"

    def repository(self) -> Repository:
        return Repository(self.root, catalogs=True, writer=Writer(self.check))

    def lock(self) -> Lock:
        if not self.spool.is_dir():
            raise UnpackedError(f"{self.name} is not a CVMFS repository of this machine (no "
                                f"{self.spool}); create it with cvmfs_server mkfs")
        return Lock(self.spool / "unpacked.lock", f"repository {self.name}")

    def _state(self) -> str | None:
        try:
            return json.loads(self.marker.read_text()).get("state")
        except (OSError, ValueError, AttributeError):
            return "open" if self.marker.exists() else None

    def _mark(self, state: str | None) -> None:
        if state is None:
            self.marker.unlink(missing_ok=True)
            return
        write_local(self.marker, json.dumps({"state": state, "pid": os.getpid(),
                                             "time": time.time()}), 0o644, sync=True)

    def is_open(self) -> bool:
        return self._state() == "open"

    def _run(self, *args: str) -> None:
        argv = [self.command, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=6 * 3600,
                                  start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransactionError(f"{' '.join(argv)}: {sanitize(exc)}") from None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise TransactionError(f"{' '.join(argv)} failed ({done.returncode}): "
                                   f"{sanitize(said[-1]) if said else 'no message'}")

    def revision(self) -> int:
        """The mounted repository's revision (CVMFS's ``user.revision`` attribute), or 0."""
        try:
            return int(os.getxattr(self.root, "user.revision"))
        except (OSError, ValueError):
            return 0

    def settled(self) -> bool:
        return self._state() is None and not self._foreign()

    def closing(self) -> int | None:
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(marker, dict) and marker.get("state") in ("opening", "publishing") \
                and isinstance(marker.get("pid"), int):
            return marker["pid"]
        return None

    def _foreign(self) -> bool:
        return (self.spool / "in_transaction.lock").exists()

    def begin(self) -> None:
        if self.is_open():
            return
        with signals_deferred():
            self._mark("opening")                 # ours from this moment, whatever happens
            crash.point("cvmfs: marked opening")
            try:
                self._run("transaction", self.name)
            except TransactionError:
                if not self._foreign():
                    self._mark(None)
                raise
            crash.point("cvmfs: transaction opened")
            self._mark("open")
        log.info("%s: transaction opened", self.name)

    def publish(self, message: str) -> list[str]:
        if not self.is_open():
            return []
        with signals_deferred():
            self._mark("publishing")
            crash.point("cvmfs: marked publishing")
            try:
                self._run("publish", "-m", message, self.name)
            except TransactionError as failed:
                log.error("%s: publish failed, aborting the transaction", self.name)
                try:
                    self._run("abort", "-f", self.name)
                except TransactionError as also:
                    self._mark("open")            # still ours: the next run aborts it
                    raise TransactionError(f"{failed}; abort failed too: {also}") from None
                self._mark(None)
                raise
            crash.point("cvmfs: published")
            self._mark(None)
        log.info("%s: published (%s)", self.name, message)
        return []

    def abort(self) -> None:
        if self._state() is None:
            return
        with signals_deferred():
            if self._foreign():
                self._run("abort", "-f", self.name)
            crash.point("cvmfs: aborted")
            self._mark(None)
        log.warning("%s: transaction aborted", self.name)

    def recover(self) -> str | None:
        state = self._state()
        if state is not None:
            if state == "publishing" and not self._foreign():
                self._mark(None)                  # the publish went through
                return "finished"
            log.warning("%s: aborting the transaction left open by an interrupted run",
                        self.name)
            self.abort()
            return "aborted"
        if self._foreign():
            raise Busy(f"{self.name} is in a transaction that this tool did not open "
                       f"({self.spool / 'in_transaction.lock'} exists); not touching it")
        return None


def make(name: str, settings) -> Publisher:
    """The publisher the settings ask for, for repository ``name``."""
    root = settings.repo_root / name
    if settings.publisher == "cvmfs":
        return CvmfsPublisher(name, root, settings.cvmfs_server, settings.cvmfs_spool)
    return LocalPublisher(name, root)
