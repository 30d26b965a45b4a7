"""Choosing the images of a multi-platform index, as containers/image does.

Attestation manifests (BuildKit's ``unknown/unknown`` entries) are never images. Without a
variant asked for, arm64's ``v8`` and no variant are the same thing; otherwise variants match
exactly.
"""

from __future__ import annotations

from .documents import Descriptor, Index, Platform

ATTESTATION = "attestation-manifest"
ALL = "all"


def is_attestation(entry: Descriptor) -> bool:
    p = entry.platform
    return (entry.annotation("vnd.docker.reference.type") == ATTESTATION
            or (p is not None and (p.os == "unknown" or p.architecture == "unknown")))


def matches(wanted: Platform, offered: Platform) -> bool:
    if offered.os != wanted.os or offered.architecture != wanted.architecture:
        return False
    if not wanted.variant:
        return True
    if wanted.architecture == "arm64" and {offered.variant, wanted.variant} <= {"", "v8"}:
        return True
    return offered.variant == wanted.variant


def images(index: Index) -> list[Descriptor]:
    """The entries of an index that are images of some platform."""
    return [e for e in index.manifests if e.platform is not None and not is_attestation(e)]


def choose(index: Index, wanted: Platform) -> Descriptor | None:
    """The entry for ``wanted``; without a variant asked for, prefer none or v8."""
    matching = [e for e in images(index) if matches(wanted, e.platform)]
    if not matching:
        return None
    if not wanted.variant:
        plain = [e for e in matching if e.platform.variant in ("", "v8")]
        if plain:
            return plain[0]
    return matching[0]


def select(index: Index, wanted: tuple[str, ...]) -> tuple[list[Descriptor], list[str]]:
    """The entries for each platform asked for (``all``: every image), and those missing."""
    if ALL in wanted:
        found, seen = [], set()
        for entry in images(index):
            if str(entry.platform) not in seen:
                seen.add(str(entry.platform))
                found.append(entry)
        return found, []
    found, missing = [], []
    for text in wanted:
        entry = choose(index, Platform.parse(text))
        if entry is None:
            missing.append(text)
        elif entry not in found:
            found.append(entry)
    return found, missing


def offered(index: Index) -> list[str]:
    """The platforms an index offers, for messages."""
    return [str(e.platform) for e in images(index)]
