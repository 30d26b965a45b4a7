"""Settings: a doit command-line variable (``doit root=/srv/x``) > ``UNPACKED_<NAME>`` > default."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UnpackedError


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; README's Settings table documents each one."""

    project: Path = Path(".")           # the folder of dodo.py: relative defaults start here
    recipes: Path | None = None         # None: recipes/ in the project
    root: Path | None = None            # None: cvmfs/ in the project (local), /cvmfs (cvmfs)
    cache: Path | None = None           # None: cache/ in the project
    publisher: str = "local"            # local | cvmfs
    platform: str = "linux/amd64"
    flatten: str = "hardlink"           # hardlink | copy (local publisher only)
    retry_attempts: int = 6             # tries of one request, first included
    retry_seconds: float = 300.0        # total time one request may spend retrying
    timeout: float = 60.0               # seconds to connect / between two reads
    registry_jobs: int = 8              # concurrent resolves per registry
    foreign_layers: bool = False        # fetch non-distributable layers from their urls
    max_layer_bytes: int = 64 << 30     # refuse a layer whose tar is larger (decompression bomb)
    cvmfs_server: str = "cvmfs_server"  # the command the cvmfs publisher runs
    cvmfs_spool: Path = Path("/var/spool/cvmfs")   # where cvmfs_server keeps its locks
    jobs: int = 0                       # doit processes; 0: chosen for this machine
    gc: bool = True                     # a bare doit also collects garbage
    gc_grace: float = 7.0               # days an unreferenced flat image or layer is kept
    gc_image_grace: float = 0.0         # days a dropped image keeps its public path
    gc_max_deletions: int = 50          # deletions per run, oldest first
    gc_prune_gone: bool = False         # remove images whose tag is gone upstream
    now: float = 0.0                    # the clock of garbage collection (tests); 0: real time

    @property
    def flatten_mode(self) -> str:
        """How flat images are written: CVMFS breaks cross-folder hardlinks, so it copies."""
        return "copy" if self.publisher == "cvmfs" or self.flatten == "copy" else "hardlink"

    def clock(self) -> float:
        return self.now or time.time()

    @property
    def recipe_path(self) -> Path:
        return self.recipes or self.project / "recipes"

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.project / "cache"

    @property
    def repo_root(self) -> Path:
        if self.root is not None:
            return self.root
        return Path("/cvmfs") if self.publisher == "cvmfs" else self.project / "cvmfs"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, kind: str, text: str) -> object:
    try:
        if "Path" in kind:
            return Path(text).expanduser().absolute()
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
    except ValueError:
        raise UnpackedError(f"setting {name}: {text!r} is not a valid {kind}") from None
    return text


def load(variables: Mapping[str, str] | None = None,
         environ: Mapping[str, str] | None = None, project: Path | None = None) -> Settings:
    """Build Settings from doit variables and the environment, checking each value."""
    variables = variables or {}
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {"project": (project or Path.cwd()).absolute()}
    for field in fields(Settings):
        if field.name == "project":
            continue
        text = variables.get(field.name)
        if text is None:
            text = environ.get(f"UNPACKED_{field.name.upper()}")
        if text is not None and text != "":
            values[field.name] = _convert(field.name, str(field.type), text)
    settings = Settings(**values)
    if settings.publisher not in ("local", "cvmfs"):
        raise UnpackedError(f"setting publisher: {settings.publisher!r} is not local or cvmfs")
    if settings.flatten not in ("hardlink", "copy"):
        raise UnpackedError(f"setting flatten: {settings.flatten!r} is not hardlink or copy")
    if settings.platform.count("/") not in (1, 2):
        raise UnpackedError(f"setting platform: {settings.platform!r} is not os/arch[/variant]")
    if settings.retry_attempts < 1:
        raise UnpackedError("setting retry_attempts: must be at least 1")
    return settings
