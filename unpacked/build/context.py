"""What a task action needs, built once per process: settings, registry client, state, publishers.

doit may run actions in forked workers, so nothing here is shared across processes: each
process builds its own on first use (diskcache and HTTP pools are not fork-safe).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from dataclasses import dataclass, field

from ..repo.publish import Publisher, make
from ..settings import Settings
from .state import State


@dataclass
class Context:
    settings: Settings
    _client: object = None
    _state: State | None = None
    _publishers: dict[str, Publisher] = field(default_factory=dict)
    _pushers: dict[str | None, object] = field(default_factory=dict)
    denied: dict[str, str] = field(default_factory=dict)     # output host -> why pushes fail

    @property
    def client(self):
        """The client for pulls: Docker/Podman credential files."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self, credentials=None):
        """A registry client with the settings' retries, timeout and token cache (requests is
        imported only here: ``doit list`` never needs it)."""
        from ..registry.auth import find_credential
        from ..registry.client import RegistryClient
        from ..registry.retry import RetryPolicy
        s = self.settings
        policy = RetryPolicy(attempts=s.retry_attempts, seconds=s.retry_seconds)
        return RegistryClient(s.cache_dir, policy=policy, timeout=s.timeout,
                              credentials=credentials or find_credential)

    @property
    def state(self) -> State:
        if self._state is None:
            self._state = State(self.settings.cache_dir)
        return self._state

    def pusher(self, user: str | None):
        """A client for thin-image pushes: the recipe's user with DUCC_OUTPUT_REGISTRY_PASS,
        else the Docker/Podman credential files."""
        if user not in self._pushers:
            from ..image.thin import password
            from ..registry.auth import Credential, find_credential
            secret = password()

            def credentials(host: str):
                if user and secret:
                    return Credential(user, secret)
                return find_credential(host)
            self._pushers[user] = self._new_client(credentials)
        return self._pushers[user]

    def publisher(self, repo: str) -> Publisher:
        if repo not in self._publishers:
            self._publishers[repo] = make(repo, self.settings)
        return self._publishers[repo]


_CONTEXTS: dict[tuple[int, Settings], Context] = {}


def context(settings: Settings) -> Context:
    key = (os.getpid(), settings)
    if key not in _CONTEXTS:
        if multiprocessing.current_process().name != "MainProcess":
            die_with_parent()
        _CONTEXTS[key] = Context(settings)
    return _CONTEXTS[key]


def die_with_parent() -> None:
    """A doit worker must not outlive its run (``kill -9`` of the run, OOM killer)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)            # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
