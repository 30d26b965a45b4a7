"""The one object a run is carried by: settings, recipes, plan and per-process resources.

doit's task generators and actions all receive it; nothing else holds run state. A parallel
run's worker processes (workers.py) each make their own from the settings and recipe set, and
build their own registry clients, state cache and publishers on first use, since HTTP pools
and diskcache handles must not cross a fork. It pickles to its settings and recipe set.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import signal
from functools import cached_property
from typing import TYPE_CHECKING

from ..recipe import RecipeSet, read
from ..repo.publish import Publisher, make
from ..settings import Settings
from .parsed import parser
from .state import State

if TYPE_CHECKING:                       # `doit list` must not pay for importing requests
    from ..registry.client import RegistryClient
    from .plan import Plan
    from .workers import Workers


class Context:
    def __init__(self, settings: Settings, recipes: RecipeSet | None = None,
                 writable: bool = True, worker: bool = False):
        self.settings = settings
        self.writable = writable        # False: a reader of cache/ (doit list as another user)
        self.worker = worker            # a worker process: reads the cache key by key
        self.keep_recipes = False       # a run keeps its recipes as parsed (an inspection no)
        self._recipes = recipes
        self._pid = os.getpid()
        self._resources: dict = {}
        self.collections: dict = {}     # repo -> the garbage collection worked out at start
        self.workers: Workers | None = None     # where @remote actions run (a parallel run)

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_recipes": self._recipes, "writable": self.writable}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"], state["_recipes"], state["writable"])
        die_with_parent()   # a worker doit spawned itself (-P process under spawn)

    def _resource(self, key, build):
        """One of this process's resources; a forked child starts afresh."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._resources = {}
            self.__dict__.pop("plan", None)
            die_with_parent()
        if key not in self._resources:
            self._resources[key] = build()
        return self._resources[key]

    # -- what the run works from --------------------------------------------------------------

    @property
    def recipes(self) -> RecipeSet:
        """The recipes, read once per run (a broken file is listed, not fatal)."""
        if self._recipes is None:
            self._recipes = read(self.settings.recipe_path,
                                 parser(self.settings.cache_dir / "recipes",
                                        self.writable and self.keep_recipes))
        return self._recipes

    @property
    def recipe_set_id(self) -> str:
        """Which recipes this run serves: doit's records are pruned per recipe set."""
        return hashlib.sha256(str(self.settings.recipe_path).encode()).hexdigest()[:16]

    @cached_property
    def plan(self) -> Plan:
        from .plan import build_plan
        return build_plan(self)

    def replan(self) -> Plan:
        """The plan again, after the resolve step changed the state."""
        self.__dict__.pop("plan", None)
        return self.plan

    @property
    def state(self) -> State:
        return self._resource("state", lambda: State(self.settings.cache_dir, self.writable,
                                                     whole=not self.worker))

    def publisher(self, repo: str) -> Publisher:
        return self._resource(("publisher", repo), lambda: make(repo, self.settings))

    # -- registries ---------------------------------------------------------------------------

    @property
    def client(self) -> RegistryClient:
        """The client for pulls: Docker/Podman credential files."""
        return self._resource("client", self._new_client)

    def pusher(self, user: str | None, host: str) -> RegistryClient:
        """A client for thin-image pushes to ``host``: the recipe's user with
        DUCC_OUTPUT_REGISTRY_PASS for that host only, else the credential files."""
        def build():
            from ..image.thin import password
            from ..registry.auth import Credential, only_for
            secret = password()
            if user and secret:
                return self._new_client(only_for(host, Credential(user, secret)))
            return self._new_client()
        return self._resource(("pusher", user, host), build)

    def _new_client(self, credentials=None) -> RegistryClient:
        """A registry client with the settings' retries, timeouts and token cache (requests is
        imported only here: ``doit list`` never needs it)."""
        from ..registry.auth import find_credential
        from ..registry.client import RegistryClient
        from ..registry.retry import RetryPolicy
        s = self.settings
        policy = RetryPolicy(attempts=s.retry_attempts, seconds=s.retry_seconds)
        return RegistryClient(s.cache_dir, policy=policy, timeout=s.timeout,
                              credentials=credentials or find_credential, deadline=s.deadline)

    def platforms_of(self, recipe) -> tuple[str, ...]:
        return recipe.platforms or self.settings.platforms


def die_with_parent() -> None:
    """A worker process must not outlive its run (``kill -9`` of the run, OOM killer)."""
    if multiprocessing.current_process().name == "MainProcess":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)            # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def default_jobs() -> int:
    """Parallel processes when not set: measured in bench/ (ingest is CPU-bound per layer)."""
    return min(2, os.cpu_count() or 1)


def parallel_jobs(settings: Settings) -> int:
    """doit's ``num_process`` for the ``jobs`` setting: 0 runs the tasks one by one here."""
    jobs = settings.jobs or default_jobs()
    return jobs if jobs > 1 else 0
