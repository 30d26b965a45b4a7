"""What an image resolves to: the plain data task generation and unpacking work from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    urls: list[str] = field(default_factory=list)


@dataclass
class Resolved:
    """Everything task generation and unpacking need for one image, offline."""

    name: str                      # registry/repository:tag as resolved (wildcards expanded)
    top_digest: str                # what the tag points at (index or manifest)
    manifest_digest: str           # the platform manifest
    media_type: str
    manifest: bytes                # exact bytes of the platform manifest
    config_digest: str
    config: bytes                  # exact bytes of the config blob
    layers: list[Layer]
    platform: str
    resolved_at: float

    @property
    def config_json(self) -> dict:
        return json.loads(self.config)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["manifest"] = self.manifest.decode("utf-8", "surrogateescape")
        d["config"] = self.config.decode("utf-8", "surrogateescape")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Resolved:
        d = dict(d)
        d["manifest"] = d["manifest"].encode("utf-8", "surrogateescape")
        d["config"] = d["config"].encode("utf-8", "surrogateescape")
        d["layers"] = [Layer(**x) for x in d["layers"]]
        return cls(**d)
