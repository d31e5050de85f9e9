"""Handles of a deployment's numbered actors (``sessions-{i}``, ``memory-{i}``), resolved once
and cached; a caller drops a stale one with ``forget`` after the actor was replaced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ShardHandles:
    def __init__(
        self, shards: int, actor_name: Callable[[int], str], resolve: Callable[[str], Any] | None = None
    ) -> None:
        self.shards = shards
        self._actor_name = actor_name
        self._resolve = resolve  # None: Serve's deployment-scoped actors (tests pass a fake)
        self._handles: dict[int, Any] = {}

    def _handle(self, shard: int) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            resolve = self._resolve
            if resolve is None:
                from ray import serve

                resolve = serve.get_deployment_actor
            handle = self._handles[shard] = resolve(self._actor_name(shard))
        return handle

    def forget(self, shard: int) -> None:
        self._handles.pop(shard, None)


__all__ = ["ShardHandles"]
