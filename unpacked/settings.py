"""Settings: a doit command-line variable (``doit root=/srv/x``) > ``UNPACKED_<NAME>`` > default.

Every name is checked (a misspelt ``platfrom=`` is an error with "did you mean"), every value
converted and range-checked here, once: the rest of the code trusts a ``Settings``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from .errors import SettingsError
from .reference import Platform

PREFIX = "UNPACKED_"
# variables of the environment that are not settings: hooks for tests, the CLI's project
OTHER_ENVIRONMENT = {"UNPACKED_CRASH_AT", "UNPACKED_CRASH_LOG", "UNPACKED_PROJECT",
                     "UNPACKED_TEST_REQUIRE_TOOLS"}


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; README's Settings table documents each one."""

    project: Path = Path(".")           # the folder of dodo.py: relative defaults start here
    recipes: Path | None = None         # None: recipes/ in the project
    root: Path | None = None            # None: cvmfs/ in the project (local), /cvmfs (cvmfs)
    cache: Path | None = None           # None: cache/ in the project
    publisher: str = "local"            # local | cvmfs
    platforms: tuple[str, ...] = ("linux/amd64",)
    flatten: str = "hardlink"           # hardlink | copy (local publisher only)
    retry_attempts: int = 6             # tries of one request, first included
    retry_seconds: float = 300.0        # total time one request may spend retrying
    timeout: float = 60.0               # seconds to connect / between two reads
    deadline: float = 300.0             # seconds one document request may take in all
    registry_jobs: int = 8              # concurrent resolves per registry
    foreign_layers: bool = False        # fetch non-distributable layers from their urls
    max_layer_bytes: int = 64 << 30     # refuse a layer whose tar is larger (decompression bomb)
    cvmfs_server: str = "cvmfs_server"  # the command the cvmfs publisher runs
    cvmfs_spool: Path = Path("/var/spool/cvmfs")   # where cvmfs_server keeps its locks
    cvmfs_arch: str = "x86_64"          # the variant symlink's default $(CVMFS_ARCH)
    jobs: int = 0                       # doit processes; 0: chosen for this machine
    gc: bool = True                     # a bare doit also collects garbage
    gc_grace: float = 7.0               # days an unreferenced flat image or layer is kept
    gc_image_grace: float = 0.0         # days a dropped image keeps its public path
    gc_max_deletions: int = 50          # deletions per run, oldest first
    gc_max_dropped: int | None = None   # more images to unpublish at once: none; None: 10,
    #                                     and never more than a tenth of the published ones
    gc_prune_gone: bool = False         # remove images whose tag is gone upstream
    anonymous: tuple[str, ...] = ()     # registries thin images are pushed to without login
    metrics_file: Path | None = None    # a Prometheus textfile written after every run
    notification_file: Path | None = None   # DUCC's JSON-lines notifications, appended
    listen_secret: str | None = None    # the shared secret registry notifications must carry
    listen_secret_file: Path | None = None  # ... or the file that holds it
    listen_debounce: float = 2.0        # seconds of quiet before queued images are converted
    now: float = 0.0                    # the clock of garbage collection (tests); 0: real time
    verbosity: int = -1                 # 0 warnings, 1 progress, 2 debug; -1: by terminal

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


NAMES = {f.name for f in fields(Settings)} - {"project"}
ALIASES = {"platform": "platforms"}       # deprecated single-platform name
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::\d+)?$")


def _number(name: str, text: str, kind, low: float | None, above: bool = False,
            high: float | None = None):
    what = "an integer" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"setting {name}: {text!r} is not {what}") from None
    if not math.isfinite(value):
        raise SettingsError(f"setting {name}: {text!r} is not a finite number")
    if low is not None and (value <= low if above else value < low):
        bound = "more than" if above else "at least"
        raise SettingsError(f"setting {name}: {text} must be {bound} {low:g}")
    if high is not None and value > high:
        raise SettingsError(f"setting {name}: {text} must be at most {high:g}")
    return value


def _size(name: str, text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise SettingsError(f"setting {name}: {text!r} is not a size (e.g. 64GiB or 1000000)")
    unit = (m.group(2) or "b").lower().rstrip("b").rstrip("i")
    value = float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                                  "t": 1 << 40}[unit]
    if value < 1:
        raise SettingsError(f"setting {name}: must be at least 1 byte")
    return int(value)


def _clock(text: str) -> float:
    try:
        return _number("now", text, float, 0)
    except SettingsError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SettingsError(f"setting now: {text!r} is neither seconds since 1970 nor an "
                            "ISO-8601 time (2026-11-28T12:00:00+00:00)") from None
    return moment.timestamp()


def _platforms(text: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise SettingsError("setting platforms: empty")
    if items == ("all",):
        return items
    for item in items:
        try:
            Platform.parse(item)
        except ValueError:
            raise SettingsError(f"setting platforms: {item!r} is not os/arch[/variant] (e.g. "
                                "linux/amd64, linux/arm64/v8) or all") from None
    return items


def _choice(name: str, text: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise SettingsError(f"setting {name}: {text!r} is not {' or '.join(allowed)}")
    return text


def _bool(name: str, text: str) -> bool:
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise SettingsError(f"setting {name}: {text!r} is not one of 1/0, true/false, yes/no, on/off")


def _hosts(text: str) -> tuple[str, ...]:
    items = tuple(h.strip() for h in text.split(",") if h.strip())
    for host in items:
        if not _HOST.match(host):
            raise SettingsError(f"setting anonymous: {host!r} is not a registry host")
    return items


def _convert(name: str, text: str) -> object:
    path = lambda: Path(text).expanduser().absolute()       # noqa: E731
    converters = {
        "recipes": path, "root": path, "cache": path, "cvmfs_spool": path,
        "metrics_file": path, "notification_file": path, "listen_secret_file": path,
        "listen_debounce": lambda: _number(name, text, float, 0),
        "publisher": lambda: _choice(name, text, ("local", "cvmfs")),
        "flatten": lambda: _choice(name, text, ("hardlink", "copy")),
        "platforms": lambda: _platforms(text),
        "retry_attempts": lambda: _number(name, text, int, 1, high=100),
        "retry_seconds": lambda: _number(name, text, float, 0, high=86400),
        "timeout": lambda: _number(name, text, float, 0, above=True, high=86400),
        "deadline": lambda: _number(name, text, float, 0, above=True, high=86400),
        "registry_jobs": lambda: _number(name, text, int, 1, high=256),
        "max_layer_bytes": lambda: _size(name, text),
        "jobs": lambda: _number(name, text, int, 0, high=256),
        "gc_grace": lambda: _number(name, text, float, 0),
        "gc_image_grace": lambda: _number(name, text, float, 0),
        "gc_max_deletions": lambda: _number(name, text, int, 1),
        "gc_max_dropped": lambda: _number(name, text, int, 0),
        "now": lambda: _clock(text),
        "anonymous": lambda: _hosts(text),
        "verbosity": lambda: _number(name, text, int, -1),
        "cvmfs_arch": lambda: _choice(name, text, tuple(ARCHES)),
    }
    if name in ("foreign_layers", "gc", "gc_prune_gone"):
        return _bool(name, text)
    if name in converters:
        return converters[name]()
    if not text.strip():
        raise SettingsError(f"setting {name}: empty")
    return text


ARCHES = ("x86_64", "aarch64", "ppc64le", "s390x", "riscv64", "armv7l", "i686")


def _unknown(shown: str, where: str, name: str, prefix: str = "") -> SettingsError:
    close = difflib.get_close_matches(name, sorted(NAMES | set(ALIASES)), n=1)
    hint = f" (did you mean {prefix}{close[0].upper() if prefix else close[0]}?)" if close \
        else ""
    return SettingsError(f"unknown setting {shown} {where}{hint}; README lists the settings")


def load(variables: Mapping[str, str] | None = None,
         environ: Mapping[str, str] | None = None, project: Path | None = None) -> Settings:
    """Build Settings from doit variables and the environment, checking every name and value."""
    variables = dict(variables or {})
    environ = os.environ if environ is None else environ
    for name in variables:
        if name not in NAMES and name not in ALIASES:
            raise _unknown(f"{name}=", "on the command line", name)
    for key in environ:
        if key.startswith(PREFIX) and key not in OTHER_ENVIRONMENT:
            name = key[len(PREFIX):].lower()
            if name not in NAMES and name not in ALIASES:
                raise _unknown(key, "in the environment", name, PREFIX)
    values: dict[str, object] = {"project": (project or Path.cwd()).absolute()}
    for name in sorted(NAMES | set(ALIASES)):
        text = variables.get(name)
        if text is None:
            text = environ.get(f"{PREFIX}{name.upper()}")
        if text is None or text == "":
            continue
        target = ALIASES.get(name, name)
        if target in values and name in ALIASES:
            continue                        # the new name wins over its deprecated alias
        try:
            values[target] = _convert(target, text)
        except SettingsError as exc:
            raise SettingsError(str(exc).replace(f"setting {target}:", f"setting {name}:", 1)) \
                from None
    return Settings(**values)
