"""What an input resolves to: the plain data task generation and conversion work from.

It is kept in ``cache/`` between runs, so it holds only checked values: digests that passed
their grammar, the exact manifest and config bytes (re-parsed, never trusted raw), layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property
from sys import intern

from .documents import ImageConfig, parse_config


def _share(obj, *names: str) -> None:
    """One string object for each digest, media type and platform however many images name
    it: a run holds every image's state (a base layer's digest was stored once per image)."""
    for name in names:
        value = getattr(obj, name)
        if type(value) is str:
            object.__setattr__(obj, name, intern(value))


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _share(self, "digest", "media_type", "diff_id")


@dataclass
class PlatformImage:
    """One image manifest of an input: a platform's manifest, config and layers."""

    platform: str              # os/arch[/variant], as the config names it
    manifest_digest: str
    media_type: str
    manifest: bytes | None     # the exact bytes fetched (None: left in the cache, ``light``)
    config_digest: str
    config: bytes | None       # the exact bytes fetched (None: left in the cache, ``light``)
    layers: list[Layer]

    def __post_init__(self) -> None:
        _share(self, "platform", "media_type", "config_digest")

    @cached_property
    def config_doc(self) -> ImageConfig:
        return parse_config(self.config, f"config {self.config_digest}")

    @property
    def arch(self) -> str:
        """``arch[:variant]``: the folder name DUCC's ``.multiarch`` uses."""
        parts = self.platform.split("/")
        return parts[1] + (f":{parts[2]}" if len(parts) > 2 else "")


@dataclass
class Resolved:
    """Everything task generation and conversion need for one input, offline."""

    name: str                      # registry/repository:tag as resolved (wildcards expanded)
    top_digest: str                # what the tag points at (index or manifest)
    top_media_type: str
    wanted: tuple[str, ...]        # the platforms asked for (or ("all",))
    images: list[PlatformImage]    # those found, in the order asked
    missing: tuple[str, ...] = ()  # platforms asked for that the index does not offer
    resolved_at: float = 0.0
    offered: tuple[str, ...] = ()  # every platform the tag offers

    def light(self) -> Resolved:
        """This state without the manifest and config bytes: what a run keeps of every image
        (planning reads digests, platforms and layers; the actions read the bytes from the
        cache). Real configs run to tens of kilobytes: ten thousand of them were the run's
        largest single holding."""
        if all(i.manifest is None and i.config is None for i in self.images):
            return self
        return replace(self, images=[replace(i, manifest=None, config=None)
                                     for i in self.images])

    def to_dict(self) -> dict:
        d = asdict(self)
        for image in d["images"]:
            if image["manifest"] is None or image["config"] is None:
                raise ValueError(f"{self.name}: a light state is not stored (its bytes are "
                                 "in the cache)")
            image["manifest"] = image["manifest"].decode("utf-8", "surrogateescape")
            image["config"] = image["config"].decode("utf-8", "surrogateescape")
        return d

    @classmethod
    def from_dict(cls, d: dict, light: bool = False) -> Resolved:
        """The stored form read back, field by field (keys it does not know are left);
        ``light``: made light at once (not copied after)."""
        images = []
        for x in d["images"]:
            manifest, config = x["manifest"], x["config"]
            if type(manifest) is not str or type(config) is not str:
                raise TypeError("the manifest and the config are stored as text")
            layers = [Layer(y["digest"], y["size"], y["media_type"], y["diff_id"],
                            tuple(y.get("urls") or ())) for y in x["layers"]]
            images.append(PlatformImage(
                x["platform"], x["manifest_digest"], x["media_type"],
                None if light else manifest.encode("utf-8", "surrogateescape"),
                x["config_digest"], None if light else config.encode("utf-8", "surrogateescape"),
                layers))
        return cls(d["name"], d["top_digest"], d["top_media_type"], tuple(d["wanted"]), images,
                   tuple(d.get("missing") or ()), d.get("resolved_at", 0.0),
                   tuple(d.get("offered") or ()))
