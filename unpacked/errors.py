"""Errors a user can act on: each carries one clear line and the exit code it means.

Entry points (``doit`` via dodo.py, the ``unpacked`` CLI) print them with one handler each;
no call site chooses an exit code. Text that came from the network goes through
``sanitize`` before it is put in a message.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1        # some images or thin-image pushes failed; the rest was published
EXIT_SETUP = 3         # bad recipe or settings, or an error outside tasks
EXIT_BUSY = 75         # another run holds the lock, or a foreign transaction is open: try later
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")


def sanitize(text: object, limit: int = 300) -> str:
    """Remote text made safe to print: one line, printable, bounded (no forged log lines, no
    terminal escapes)."""
    out = _UNPRINTABLE.sub(" ", str(text)).strip()
    out = re.sub(r" {2,}", " ", out)
    return out if len(out) <= limit else out[:limit] + "…"


class UnpackedError(Exception):
    """Base of every error caused by input, a registry or the environment, not by a bug."""

    exit_code = EXIT_SETUP

    def messages(self) -> list[str]:
        """What to print: one line per problem."""
        return str(self).splitlines() or [type(self).__name__]


class SettingsError(UnpackedError):
    """A setting has an unknown name or a value out of range."""


class RecipeError(UnpackedError):
    """A recipe file is malformed; each line names file, line and key."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(lines))


class BadReference(UnpackedError):
    """An image reference cannot be parsed."""


class Busy(UnpackedError):
    """Another run holds the lock, or a transaction this tool did not open: try later."""

    exit_code = EXIT_BUSY


class ImageError(UnpackedError):
    """One image (or layer) cannot be converted; other images go on."""

    exit_code = EXIT_FAILED


class RegistryError(ImageError):
    """A registry refused or failed a request; the message names the image and the answer."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        self.status = status
        self.code = code
        super().__init__(message)


class NotFound(RegistryError):
    """The registry answered 404 for a manifest, blob or repository."""


class Unauthorized(RegistryError):
    """The registry refused our credentials (or their absence)."""


class DigestMismatch(RegistryError):
    """Bytes received do not hash to the digest they were asked for."""


class Unsupported(RegistryError):
    """A manifest kind we deliberately do not convert (schema1, artifacts)."""


class BadDocument(RegistryError):
    """A registry document (manifest, index, config, tag list, token) breaks its format."""


class Unreachable(RegistryError):
    """The registry cannot be reached at all (name resolution, TLS, refused connection)."""


class LocalFileError(UnpackedError):
    """A file of this machine cannot be read or written (disk full, read-only, permissions)."""


HINTS = {28: "the disk is full", 30: "the file system is read-only", 13: "permission denied",
         1: "operation not permitted", 122: "the disk quota is exceeded", 5: "input/output error"}


def environmental(exc: BaseException) -> bool:
    """An OSError that says what state the machine is in (full, read-only, not ours, failing
    disk), which an operator mends; any other OSError is a bug to see with its traceback."""
    return isinstance(exc, OSError) and exc.errno in HINTS


def from_os(exc: OSError) -> LocalFileError:
    """An OSError of the machine as one line naming the file and what is wrong."""
    where = exc.filename or "a local file"
    what = HINTS.get(exc.errno or 0) or exc.strerror or str(exc)
    return LocalFileError(f"cannot write or read {where}: {what}")
