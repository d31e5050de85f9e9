"""The memory API of a shard: list, search, add and delete one user's memories.

``MemoryApi`` is held by ``MemoryShard`` (which delegates its public methods to it), with the
shard's users, embeddings and clock. Every call names the tenant and the user; a memory id of
another user or tenant reads as not found. A write is in the user's journal
(actors/memory/journal.py) before it returns: acknowledged means durable. Responses are plain
dicts in the shapes docs/memory.md gives for the HTTP endpoints, so the ingress can return
them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from actors.memory.embedding import ShardEmbeddings
from actors.memory.learning.extraction import IMPORTANCE, KINDS, FactCandidate, as_memory_query
from actors.memory.users import MemoryUsers
from cluster.config.memory import MemoryConfig
from cluster.errors import CapacityError, InvalidRequestError, NotFoundError

MAX_MEMORY_CHARS = 2_000
MAX_LIST_LIMIT = 1_000


def history_turns(history: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Session messages grouped into turns (a turn starts at a user message after a reply);
    system messages are left out."""
    turns: list[list[dict[str, str]]] = []
    for message in history:
        role = message.get("role")
        if role == "system":
            continue
        entry = {"role": role, "content": message.get("content", "")}
        if not turns or (role == "user" and turns[-1][-1]["role"] == "assistant"):
            turns.append([entry])
        else:
            turns[-1].append(entry)
    return turns


def _check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("text must be a non-empty string", param="text")
    if len(text) > MAX_MEMORY_CHARS:
        raise InvalidRequestError(
            f"text is {len(text)} characters; a memory holds at most {MAX_MEMORY_CHARS}", param="text"
        )
    return text.strip()


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit={limit} is not in [1, {MAX_LIST_LIMIT}]", param="limit")
    if offset < 0:
        raise InvalidRequestError(f"offset={offset} is negative; use offset >= 0", param="offset")


class MemoryApi:
    """List, search, add and delete memories (see the module docstring)."""

    def __init__(
        self,
        config: MemoryConfig,
        users: MemoryUsers,
        embeddings: ShardEmbeddings,
        clock: Callable[[], float],
        tenant_full: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.users = users
        self.embeddings = embeddings
        self.clock = clock
        self.tenant_full = tenant_full

    async def list_memories(
        self, tenant: str, user: str, *, include_history: bool = False, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """The user's memories, newest first (superseded ones too with ``include_history``)."""
        _check_page(limit, offset)
        memory = await self.users.read(tenant, user)
        records = [r for r in memory.longterm.records.values() if include_history or r.active]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        page = records[offset : offset + limit]
        return {
            "object": "list",
            "data": [r.public() for r in page],
            "total": len(records),
            "has_more": offset + limit < len(records),
        }

    async def search_memories(self, tenant: str, user: str, query: str, *, limit: int = 10) -> dict[str, Any]:
        """The active memories closest to ``query`` by ranking score (uses are not counted)."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query must be a non-empty string", param="query")
        _check_page(limit, 0)
        memory = await self.users.read(tenant, user)
        if not memory.longterm.active_count:
            return {"object": "list", "data": []}
        vector = (await self.embeddings.embed([as_memory_query(query)]))[0]
        found = memory.longterm.search(vector, limit, self.clock(), touch=False)
        return {
            "object": "list",
            "data": [
                {**item.record.public(), "similarity": round(item.similarity, 4), "score": round(item.score, 4)}
                for item in found
            ],
        }

    async def add_memory(
        self,
        tenant: str,
        user: str,
        text: str,
        *,
        kind: str = "attribute",
        importance: float | None = None,
        slot: str | None = None,
        value: str = "",
    ) -> dict[str, Any]:
        """Add a fact by hand; it is deduplicated like an extracted one (a paraphrase updates,
        a new value in the same ``slot`` supersedes)."""
        text = _check_text(text)
        if kind not in KINDS:
            raise InvalidRequestError(f"kind={kind!r} is not one of {', '.join(KINDS)}", param="kind")
        importance = IMPORTANCE[kind] if importance is None else importance
        if not 0.0 <= importance <= 1.0:
            raise InvalidRequestError(f"importance={importance} is not in [0, 1]", param="importance")
        if self.tenant_full(tenant):
            limit = self.config.capacity.tenant_max_bytes
            raise CapacityError(
                f"tenant {tenant!r} reached memory.capacity.tenant_max_bytes={limit}; delete memories "
                "or ask the operator to raise the limit",
                retry_after=60.0,
                param="text",
            )
        memory = await self.users.get(tenant, user)
        vector = (await self.embeddings.embed([text]))[0]
        candidate = FactCandidate(text, kind, importance, slot.strip().lower() if slot else None, value)
        decision = memory.longterm.apply(candidate, vector, "api", self.clock())
        record = memory.longterm.records[decision.memory_id] if decision.memory_id else None
        if record is not None and decision.action in ("add", "supersede"):
            record.origin = "api"
        if memory.longterm.active_count > self.config.capacity.max_memories_per_user:
            memory.longterm.cleanup(self.clock())
        memory.dirty = True
        self.users.schedule_flush()
        record = memory.longterm.records.get(decision.memory_id or "")  # evicted at once if lowest
        if decision.action != "none":  # durable before the answer (actors/memory/journal.py)
            ids = dict.fromkeys((decision.memory_id or "", *decision.targets))
            changed = [memory.longterm.records[i] for i in ids if i in memory.longterm.records]
            await self.users.journal(memory, "put", changed)
        return {"decision": decision.public(), "memory": record.public() if record else None}

    async def import_memories(
        self,
        tenant: str,
        user: str,
        items: Sequence[dict[str, Any]],
        vectors: Any = None,
    ) -> dict[str, Any]:
        """Bulk import into a user without memories, with no deduplication (migration from
        another store). ``items``: dicts with ``text`` and optional ``kind``, ``importance``,
        ``slot``, ``value``; ``vectors``: their unit embeddings if already computed. The
        index (and its graph) is built once, off the event loop."""
        import asyncio

        import numpy as np

        from actors.memory.longterm import UserLongTerm
        from actors.memory.recall.index import quantize
        from actors.memory.records import MemoryRecord, new_memory_id

        memory = await self.users.get(tenant, user)
        if memory.longterm.records:
            raise InvalidRequestError(
                f"user {user!r} already has memories; import into an empty user or add them one by one",
                param="user",
            )
        capacity = self.config.capacity.max_memories_per_user
        if len(items) > capacity:
            raise InvalidRequestError(
                f"{len(items)} memories are more than memory.capacity.max_memories_per_user={capacity}; "
                "raise the capacity or import fewer",
                param="items",
            )
        texts = [_check_text(item.get("text")) for item in items]
        if vectors is None:
            vectors = await self.embeddings.embed(texts)
        vectors = np.asarray(vectors, dtype=np.float32)
        now = self.clock()
        records = []
        for key, (item, text) in enumerate(zip(items, texts), start=1):
            kind = item.get("kind", "attribute")
            records.append(MemoryRecord(
                id=new_memory_id(), tenant=tenant, user=user, text=text,
                kind=kind if kind in KINDS else "attribute",
                importance=float(item.get("importance", IMPORTANCE.get(kind, 0.6))),
                created_at=now, updated_at=now, last_accessed_at=now, slot=item.get("slot"),
                value=str(item.get("value", "")), origin="import", key=key,
            ))
        stored_all = quantize(vectors, self.config.index.embedding_dtype)
        stored = {r.id: stored_all[i] for i, r in enumerate(records)}
        fresh = UserLongTerm(tenant, user, vectors.shape[1], self.config)
        await asyncio.to_thread(fresh.load, records, stored, None)
        if memory.longterm.records:
            raise InvalidRequestError(f"user {user!r} got memories during the import; retry", param="user")
        memory.longterm = fresh
        memory.dirty = True
        await self.users.flush(include_touched=False)  # durable first
        return {"object": "memory.import", "imported": len(records), "graph": fresh.index.uses_graph}

    async def get_memory(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        memory = await self.users.read(tenant, user)
        record = memory.longterm.records.get(memory_id)
        if record is None:
            raise _not_found(memory_id)
        return record.public()

    async def delete_memory(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        memory = await self.users.get(tenant, user)
        if not memory.longterm.delete(memory_id):
            raise _not_found(memory_id)
        memory.dirty = True
        self.users.schedule_flush()
        await self.users.journal(memory, "delete", ids=[memory_id])
        return {"id": memory_id, "object": "memory", "deleted": True}

    async def delete_user_memories(self, tenant: str, user: str) -> dict[str, Any]:
        """Forget the user: long-term facts, history, sessions' windows and summaries."""
        from actors.memory.episodic import UserEpisodes

        memory = await self.users.get(tenant, user)
        deleted = memory.longterm.delete_all()
        sessions = len(memory.episodes.sessions)
        memory.episodes = UserEpisodes()
        if memory.units is not None:
            from actors.memory.units import UserUnits

            memory.units = UserUnits(memory.units.dense.dimension, memory.units.config)
        memory.dirty = True
        self.users.schedule_flush()
        await self.users.journal(memory, "delete_all")
        return {"object": "memory.deleted_all", "user": user, "deleted": deleted, "sessions": sessions}


def _not_found(memory_id: str) -> NotFoundError:
    return NotFoundError(
        f"memory_id={memory_id!r} does not exist for this user (or belongs to another tenant)",
        param="memory_id",
    )


__all__ = ["MemoryApi", "history_turns"]
