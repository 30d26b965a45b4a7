"""Image references: parsing every form operators write, Docker's normalisation, placeholders.

Accepted forms (see README): DUCC's URL form ``https://host/repo:tag``, ``http://`` when written so,
``host[:port]/repo[:tag][@digest]`` and Docker's short names (``fedora``, ``library/fedora:39``).
The registry host stays as written (it names the public path); only the API host is mapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from operator import attrgetter

from .errors import BadReference

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry.hub.docker.com",
                              "registry-1.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"
GLOB_CHARS = frozenset("*?[")
PLACEHOLDERS = ("scheme", "registry", "repository", "tag", "digest", "reference", "image")

_HOST = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
                   r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
DIGEST = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_GLOB_TAG = re.compile(r"^[a-zA-Z0-9_.*?\[\]!-]{1,128}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
_PLACEHOLDER = re.compile(r"\$\(([^)]*)\)")
PLATFORM_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


@dataclass(frozen=True)
class ImageRef:
    """One image as an operator wrote it, normalised the way Docker does."""

    scheme: str
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host that serves ``/v2/``: Docker Hub's aliases all map to registry-1.docker.io."""
        return DOCKER_HUB_API if self.registry in DOCKER_HUB_HOSTS else self.registry

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.api_host}"

    @property
    def is_wildcard(self) -> bool:
        return self.tag is not None and any(c in GLOB_CHARS for c in self.tag)

    @cached_property
    def reference(self) -> str:
        """``:tag``, ``@digest`` or ``:tag@digest``, as DUCC's ``$(reference)``."""
        out = f":{self.tag}" if self.tag else ""
        return out + (f"@{self.digest}" if self.digest else "")

    @cached_property
    def image(self) -> str:
        return self.repository + self.reference

    @cached_property
    def name(self) -> str:
        """``registry/repository:tag``: the canonical text of this reference."""
        return f"{self.registry}/{self.image}"

    @property
    def url(self) -> str:
        """DUCC's URL form, the ``origin`` a thin image records."""
        return f"{self.scheme}://{self.name}"

    def with_tag(self, tag: str) -> ImageRef:
        """This reference with another tag (one a registry listed): checked, since a tag ends
        up in paths."""
        if not is_tag(tag):
            raise BadReference(f"{self.registry}/{self.repository}: invalid tag {tag!r}")
        return replace(self, tag=tag)

    def placeholders(self) -> dict[str, str]:
        return {name: get(self) for name, get in _VALUES.items()}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``; raises ValueError when it is not that."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(PLATFORM_PART.match(p) for p in parts):
            raise ValueError(f"{text!r} is not os/arch[/variant]")
        return cls(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def is_digest(text: object) -> bool:
    """A digest safe to use as a folder name: sha256 or sha512, lowercase hex."""
    return isinstance(text, str) and DIGEST.match(text) is not None


def is_tag(text: object) -> bool:
    return isinstance(text, str) and TAG.match(text) is not None


def _host_and_path(text: str) -> tuple[str, str, str]:
    """(scheme, registry host, the rest) of a reference in any accepted form."""
    s = text.strip()
    m = _SCHEME.match(s)
    if m:
        scheme = m.group(1).lower()
        if scheme not in ("http", "https"):
            raise BadReference(f"{text!r}: scheme must be https:// or http://, not {scheme}://")
        host, _, path = m.group(2).partition("/")
        if not host:
            raise BadReference(f"{text!r}: no registry host after {scheme}://")
    else:
        scheme = "https"
        first, sep, rest = s.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            host, path = first, rest
        else:
            host, path = "docker.io", s
    if not _HOST.match(host):
        raise BadReference(f"{text!r}: invalid registry host {host!r}")
    return scheme, host, path


def _repository_tag_digest(text: str, path: str) -> tuple[str, str | None, str]:
    path, at, digest = path.partition("@")
    if at and not digest:
        raise BadReference(f"{text!r}: empty digest after '@'")
    if "@" in digest:
        raise BadReference(f"{text!r}: more than one '@'")
    slash = path.rfind("/")
    colon = path.find(":", slash + 1)
    repository, tag = (path[:colon], path[colon + 1:]) if colon >= 0 else (path, None)
    repository = repository.strip("/")
    if not repository:
        raise BadReference(f"{text!r}: no repository name")
    for component in repository.split("/"):
        if not _COMPONENT.match(component):
            hint = " (repository names are lowercase)" if component.lower() != component else ""
            raise BadReference(f"{text!r}: invalid repository component {component!r}{hint}")
    return repository, tag, digest


def _check_tag(text: str, tag: str | None) -> None:
    if tag is None:
        return
    if not tag:
        raise BadReference(f"{text!r}: empty tag after ':'")
    glob = any(c in GLOB_CHARS for c in tag)
    if not (_GLOB_TAG if glob else TAG).match(tag):
        raise BadReference(f"{text!r}: invalid tag {tag!r}")


def _check_digest(text: str, digest: str, tag: str | None) -> None:
    if not digest:
        return
    if not _ANY_DIGEST.match(digest):
        raise BadReference(f"{text!r}: invalid digest {digest!r}")
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise BadReference(f"{text!r}: unsupported digest algorithm {algorithm!r}")
    if not is_digest(digest):
        raise BadReference(f"{text!r}: a {algorithm} digest is lowercase hex digits "
                           f"({64 if algorithm == 'sha256' else 128} of them)")
    if tag is not None and any(c in GLOB_CHARS for c in tag):
        raise BadReference(f"{text!r}: a wildcard tag cannot be pinned to a digest")


def parse(text: str) -> ImageRef:
    """Parse one image reference; raise BadReference with the reason when it is not valid."""
    if not isinstance(text, str) or not text.strip():
        raise BadReference("empty image reference")
    scheme, host, path = _host_and_path(text)
    repository, tag, digest = _repository_tag_digest(text, path)
    if len(host) + 1 + len(repository) > 255:
        raise BadReference(f"{text!r}: name longer than 255 characters")
    _check_tag(text, tag)
    _check_digest(text, digest, tag)
    if host in DOCKER_HUB_HOSTS and "/" not in repository:
        repository = "library/" + repository
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(scheme, host, repository, tag, digest or None)


def placeholders_in(template: str) -> list[str]:
    """The ``$(...)`` names used in a template, in order."""
    return _PLACEHOLDER.findall(template)


_VALUES = {"scheme": attrgetter("scheme"), "registry": attrgetter("registry"),
           "repository": attrgetter("repository"), "tag": lambda ref: ref.tag or "",
           "digest": lambda ref: ref.digest or "", "reference": attrgetter("reference"),
           "image": attrgetter("image")}


@lru_cache(maxsize=256)
def _compiled(template: str) -> tuple:
    """A template as its literal pieces and the getters of its placeholders, in order."""
    pieces = _PLACEHOLDER.split(template)
    return tuple(piece if i % 2 == 0 else _VALUES[piece] for i, piece in enumerate(pieces))


def format_template(template: str, ref: ImageRef) -> str:
    """Expand ``$(name)`` placeholders (names checked at recipe load). A template is split
    once: every input's public path is formatted a few times a run."""
    return "".join([p if type(p) is str else p(ref) for p in _compiled(template)])
