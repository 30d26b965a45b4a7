"""Choosing one image of a multi-arch index for a platform, as containers/image does."""

from __future__ import annotations

from dataclasses import dataclass

ATTESTATION = "attestation-manifest"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        return cls(parts[0], parts[1], parts[2] if len(parts) > 2 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, platform: dict) -> bool:
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        if not self.variant:
            return True
        have = platform.get("variant", "")
        if self.architecture == "arm64" and {have, self.variant} <= {"", "v8"}:
            return True
        return have == self.variant


def is_attestation(entry: dict) -> bool:
    annotations = entry.get("annotations") or {}
    platform = entry.get("platform") or {}
    return (annotations.get("vnd.docker.reference.type") == ATTESTATION
            or (platform.get("os") == "unknown" and platform.get("architecture") == "unknown"))


def choose(index: dict, wanted: Platform) -> dict | None:
    """The first entry of an index for ``wanted``; without a variant wanted, prefer none or v8."""
    entries = [e for e in index.get("manifests") or [] if not is_attestation(e)]
    matching = [e for e in entries if wanted.matches(e.get("platform") or {})]
    if not matching:
        return None
    if not wanted.variant:
        plain = [e for e in matching if (e.get("platform") or {}).get("variant", "") in ("", "v8")]
        if plain:
            return plain[0]
    return matching[0]


def available(index: dict) -> list[str]:
    """The platforms an index offers, for error messages."""
    out = []
    for e in index.get("manifests") or []:
        if is_attestation(e):
            continue
        p = e.get("platform") or {}
        found = Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant", ""))
        out.append(str(found))
    return out
