"""The ingress's client of the memory shards.

The shards are Serve deployment-scoped actors of the ingress deployment (``app.py`` declares
them as ``memory-0`` ... ``memory-{M-1}``), each a ``actors.memory.shard.MemoryShard``; a
(tenant, user) lives on shard ``shard_for(tenant, user, M)``.

Memory is an aid to a chat request, never a condition of it: ``recall`` answers None (and
logs a warning) when the shard is down, slow or failing, and the LLMServer then falls back on
the plain sliding window over the session. ``absorb`` runs in the background and is never
awaited before a reply; the next ``recall`` of the same session in this replica waits for it
(it returns once the turn is in the session's window, milliseconds), so a quick follow-up
still sees the previous turn. The memory API calls (list, search, add, delete) raise: there
the caller asked for memory itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from actors.memory.forget import session_user as session_scoped_user
from actors.memory.shard import shard_for
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger
from deployments.errors import as_mai_error
from deployments.ingress.stores.shard_handles import ShardHandles

log = get_logger("deployments.ingress.stores.memory_client")

RECALL_TIMEOUT_S = 10.0  # covers loading the embedder on the first recall (MiniLM: ~5 s)
ABSORB_WAIT_S = 2.0
USAGE_COUNTS = ("users", "memories", "history", "sessions", "turns", "summaries", "bytes")  # how long a recall waits for the same session's absorb in flight


def memory_actor_name(shard: int) -> str:
    return f"memory-{shard}"


def memory_user(request_user: str | None, session_user: str | None, session_id: str) -> str:
    """Whose memory a session request reads and feeds: the request's ``user`` field, else the
    session's user, else the session itself (memory then stays within that session)."""
    return request_user or session_user or session_scoped_user(session_id)


class MemoryClient(ShardHandles):
    """Recall, absorb and the memory API across the memory shards."""

    def __init__(self, shards: int, resolve: Callable[[str], Any] | None = None) -> None:
        super().__init__(shards, memory_actor_name, resolve)
        self._absorbing: dict[tuple[str, str], asyncio.Task[Any]] = {}

    async def _call(self, tenant: str, user: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call on the user's shard."""
        shard = shard_for(tenant, user, self.shards)
        return await self._call_shard(shard, method, tenant, user, *args, **kwargs)

    async def _call_shard(self, shard: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call on a shard, retried once on a fresh handle if the actor was replaced;
        failures leave as ``MAIError`` (503 when the shard is unavailable)."""
        import ray

        for attempt in range(2):
            try:
                handle = self._handle(shard)
                return await getattr(handle, method).remote(*args, **kwargs)
            except (ValueError, ray.exceptions.RayActorError):
                self.forget(shard)  # not registered yet, or a stale handle
                if attempt == 0:
                    await asyncio.sleep(0.2)
            except Exception as exc:
                raise as_mai_error(exc, f"the memory shard {shard}") from None
        raise EngineDeadError(f"the memory shard {shard} is unavailable; retry shortly")

    # -- the request path ---------------------------------------------------------------------

    async def recall(
        self,
        tenant: str,
        user: str,
        session_id: str,
        query: str | None,
        history: Sequence[dict[str, str]],
        touch: bool = True,
    ) -> Any:
        """The ``MemoryRecall`` for a request, or None when memory cannot answer (logged).
        ``touch``: the facts recalled count as used (False for a preview of the prompt)."""
        pending = self._absorbing.get((tenant, session_id))
        if pending is not None and not pending.done():
            await asyncio.wait([pending], timeout=ABSORB_WAIT_S)
        try:
            return await asyncio.wait_for(
                self._call(tenant, user, "recall", session_id, query, history=list(history), touch=touch),
                RECALL_TIMEOUT_S,
            )
        except Exception as exc:
            log.warning(
                "memory recall failed; answering with the session's sliding window",
                extra={"tenant": tenant, "session": session_id, "error": repr(exc)[:300]},
            )
            return None

    def absorb(
        self, tenant: str, user: str, session_id: str, turn_id: int, turn: list[dict[str, str]]
    ) -> asyncio.Task[Any]:
        """Hand a finished turn to memory in the background (failures are logged)."""
        key = (tenant, session_id)

        async def run() -> None:
            try:
                await self._call(tenant, user, "absorb_turn", session_id, turn_id, turn)
            except Exception as exc:
                log.warning(
                    "memory could not absorb a turn; it stays in the session only",
                    extra={"tenant": tenant, "session": session_id, "error": repr(exc)[:300]},
                )
            finally:
                if self._absorbing.get(key) is task:
                    del self._absorbing[key]

        task = asyncio.get_running_loop().create_task(run())
        self._absorbing[key] = task
        return task

    # -- the memory API -----------------------------------------------------------------------

    async def list(
        self, tenant: str, user: str, include_history: bool, limit: int, offset: int
    ) -> dict[str, Any]:
        return await self._call(
            tenant, user, "list_memories", include_history=include_history, limit=limit, offset=offset
        )

    async def search(self, tenant: str, user: str, query: str, limit: int) -> dict[str, Any]:
        return await self._call(tenant, user, "search_memories", query, limit=limit)

    async def add(self, tenant: str, user: str, **fields: Any) -> dict[str, Any]:
        text = fields.pop("text")
        return await self._call(tenant, user, "add_memory", text, **fields)

    async def absorb_turn(self, tenant: str, user: str, session_id: str, turn_id: int,
                          messages: list[dict[str, Any]], at: float | None) -> dict[str, Any]:
        """Absorb one turn now (the import API; chat turns go through ``absorb``)."""
        return await self._call(tenant, user, "absorb_turn", session_id, turn_id, messages, at=at)

    async def get(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self._call(tenant, user, "get_memory", memory_id)

    async def delete(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self._call(tenant, user, "delete_memory", memory_id)

    async def delete_all(self, tenant: str, user: str) -> dict[str, Any]:
        return await self._call(tenant, user, "delete_user_memories")

    async def forget_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Every shard forgets what it absorbed from the session (actors/memory/forget.py).
        Raises (503) when a shard cannot be reached: a deleted conversation must not stay in
        memory, so the caller keeps the session and the client retries."""
        # A turn still on its way is refused by the shard once the session is forgotten.
        self._absorbing.pop((tenant, session_id), None)
        results = await asyncio.gather(
            *(self._call_shard(i, "forget_session", tenant, session_id) for i in range(self.shards))
        )
        return {
            "session_user_removed": any(r.get("session_user_removed") for r in results),
            "windows_removed": sum(r.get("windows_removed", 0) for r in results),
            "turns_dropped": sum(r.get("turns_dropped", 0) for r in results),
        }

    async def usage(self, tenant: str) -> dict[str, Any]:
        """The tenant's usage row summed over every shard (a shard that is down is skipped)."""
        import ray

        async def one(shard: int) -> dict[str, Any]:
            try:
                return await self._handle(shard).usage.remote(tenant)
            except (ValueError, ray.exceptions.RayActorError):
                self.forget(shard)
                log.warning("memory shard unavailable for usage", extra={"shard": shard})
                return {}

        rows = [r.get(tenant) for r in await asyncio.gather(*(one(i) for i in range(self.shards)))]
        return sum_usage(tenant, [r for r in rows if r])


def sum_usage(tenant: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and bytes added over shards; the limit fraction and warning are the worst shard's
    (``tenant_max_bytes`` is a limit per shard)."""
    out: dict[str, Any] = {"object": "memory.usage", "tenant": tenant, **dict.fromkeys(USAGE_COUNTS, 0)}
    for row in rows:
        for key, value in row.items():
            if key in ("tenant", "limit_bytes", "limit_fraction", "warning"):
                continue
            if key in USAGE_COUNTS:
                out[key] = out.get(key, 0) + value
    fractions = [r.get("limit_fraction") for r in rows if r.get("limit_fraction") is not None]
    out["limit_bytes"] = next((r.get("limit_bytes") for r in rows if r.get("limit_bytes")), None)
    out["limit_fraction"] = max(fractions) if fractions else None
    out["warning"] = next((r["warning"] for r in rows if r.get("warning")), None)
    return out


__all__ = ["MemoryClient", "memory_actor_name", "memory_user", "sum_usage"]
