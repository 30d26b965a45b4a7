"""Errors a user can act on: each carries one clear line, never a traceback."""


class UnpackedError(Exception):
    """Base of every error caused by input, a registry or the environment, not by a bug."""


class RecipeError(UnpackedError):
    """A recipe file is malformed; the message names file, line and key."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class BadReference(UnpackedError):
    """An image reference cannot be parsed."""


class RegistryError(UnpackedError):
    """A registry refused or failed a request; the message names image and the registry's answer."""

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
