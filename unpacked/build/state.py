"""The resolved state kept in ``cache/``: what each input pointed at when last resolved.

Task generation reads only this (and the recipes), so ``doit list``/``info``/``forget`` work
offline. Values are plain JSON-able dicts so that a code upgrade never breaks the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import diskcache

from ..registry.resolved import Resolved


class State:
    def __init__(self, cache_dir: Path):
        cache_dir.mkdir(parents=True, exist_ok=True)
        folder = cache_dir / "state"
        folder.mkdir(exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        self.cache = diskcache.Cache(str(folder))

    def close(self) -> None:
        self.cache.close()

    @staticmethod
    def _key(kind: str, name: str, platform: str = "") -> str:
        return f"{kind}\x1f{name}\x1f{platform}"

    def resolved(self, name: str, platform: str) -> Resolved | None:
        got = self.cache.get(self._key("resolved", name, platform))
        return Resolved.from_dict(got) if got else None

    def put_resolved(self, resolved: Resolved) -> None:
        self.cache.set(self._key("resolved", resolved.name, resolved.platform), resolved.to_dict())

    def tags(self, name: str) -> list[str] | None:
        return self.cache.get(self._key("tags", name))

    def put_tags(self, name: str, tags: list[str]) -> None:
        self.cache.set(self._key("tags", name), list(tags))

    def blob_home(self, registry: str, digest: str) -> str | None:
        """A repository of ``registry`` we pushed ``digest`` to (for cross-repo mounts)."""
        return self.cache.get(self._key("blob", registry, digest))

    def put_blob_home(self, registry: str, digest: str, repository: str) -> None:
        self.cache.set(self._key("blob", registry, digest), repository)

    def failure(self, name: str) -> str | None:
        return self.cache.get(self._key("failure", name))

    def put_failure(self, name: str, reason: str | None, gone: bool = False) -> None:
        """Record why ``name`` failed to resolve (None: it resolved); ``gone``: a 404."""
        key, gone_key = self._key("failure", name), self._key("gone", name)
        if reason is None:
            if key in self.cache:            # a read is far cheaper than a delete
                self.cache.delete(key)
                self.cache.delete(gone_key)
            return
        self.cache.set(key, reason)
        if gone:
            self.cache.set(gone_key, True)
        else:
            self.cache.delete(gone_key)

    def gone(self, name: str) -> bool:
        """The registry answered 404 for ``name`` at its last resolve: gone upstream."""
        return bool(self.cache.get(self._key("gone", name)))
