"""The ingress's client of the session store shards.

The shards are Serve deployment-scoped actors of the ingress deployment (``app.py`` declares
them as ``sessions-0`` ... ``sessions-{S-1}``), created by the Serve controller before the
ingress replicas and shared by all of them. A session lives on shard
``actors.sessions.requests.shard_for(session_id, S)``; each shard is a durable
``actors.sessions.shard.SessionShard`` (write-ahead log + snapshots under
``serving.session_state_uri``). Handles are cached and resolved again when
Serve has replaced an actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from actors.sessions.requests import new_session_id, shard_for
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger
from deployments.errors import as_mai_error
from deployments.ingress.stores.shard_handles import ShardHandles
from deployments.protocol import SessionCreateRequest, SessionInfo

log = get_logger("deployments.ingress.stores.sessions")


def session_actor_name(shard: int) -> str:
    return f"sessions-{shard}"


class SessionClient(ShardHandles):
    """Create, read, extend and delete sessions across the store shards."""

    def __init__(self, shards: int, resolve: Callable[[str], Any] | None = None) -> None:
        super().__init__(shards, session_actor_name, resolve)

    async def _call(self, shard: int, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        for attempt in range(5):
            try:
                handle = self._handle(shard)
            except ValueError:  # Serve is (re)creating the actor: its name is not registered yet
                await self._backoff(shard, attempt, "not registered")
                continue
            try:
                return await getattr(handle, method).remote(*args, **kwargs)
            except ray.exceptions.RayActorError:  # the actor was replaced: the handle is stale
                await self._backoff(shard, attempt, "dead")
            except Exception as exc:
                raise as_mai_error(exc, f"the session store shard {shard}") from None
        raise EngineDeadError(f"the session store shard {shard} is unavailable; retry shortly")

    async def _backoff(self, shard: int, attempt: int, why: str) -> None:
        self.forget(shard)
        log.warning(
            "session store shard unavailable, retrying",
            extra={"shard": shard, "why": why, "attempt": attempt},
        )
        await asyncio.sleep(0.2 * (attempt + 1))

    async def _call_for(self, session_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(shard_for(session_id, self.shards), method, session_id, *args, **kwargs)

    async def create(self, tenant: str, request: SessionCreateRequest) -> SessionInfo:
        sid = new_session_id()
        info = await self._call(
            shard_for(sid, self.shards),
            "create",
            tenant,
            sid,
            request.system_prompt,
            request.metadata,
            user=request.user,
        )
        return SessionInfo.model_validate(info)

    async def get(self, session_id: str, tenant: str) -> SessionInfo:
        return SessionInfo.model_validate(await self._call_for(session_id, "get", tenant))

    async def list(self, tenant: str) -> list[SessionInfo]:
        shards = await asyncio.gather(
            *(self._call(i, "list_sessions", tenant) for i in range(self.shards))
        )
        return sorted(
            (SessionInfo.model_validate(s) for shard in shards for s in shard),
            key=lambda s: (s.created, s.id),
        )

    async def delete(self, session_id: str, tenant: str) -> bool:
        return await self._call_for(session_id, "delete", tenant)

    async def context(self, session_id: str, tenant: str) -> list[dict[str, str]]:
        """The session's messages so far (system prompt first), to prepend to a new turn."""
        return await self._call_for(session_id, "context", tenant)

    async def details(self, session_id: str, tenant: str) -> dict[str, Any]:
        """The session's summary with ``system_prompt``, ``user`` and ``messages`` (no system
        message among them): what memory needs, in one call."""
        return await self._call_for(session_id, "get", tenant)

    async def append(
        self, session_id: str, tenant: str, messages: list[dict[str, str]], request_id: str | None = None
    ) -> int:
        """Store one turn; durable when it returns. ``request_id`` makes a retry (after a
        store actor was replaced mid-call) idempotent: the turn is never stored twice."""
        return await self._call_for(session_id, "append", tenant, messages, request_id=request_id)


__all__ = ["SessionClient", "session_actor_name"]
