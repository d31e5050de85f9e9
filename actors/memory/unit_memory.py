"""The memory shard's half of memory units: keep every absorbed message, embed it, find it.

``UnitMemory`` is held by ``MemoryShard``; it works on the users of ``MemoryUsers`` with the
shard's ``ShardEmbeddings`` and token counter:

- ``absorb`` turns the messages of an absorbed turn into units at once (lexical index
  and resolved dates included: the next request can find them by their words);
- ``embed_pending`` runs in the shard's background worker before each batch of jobs: it
  embeds the units still without a vector, in batches (a batch pads little: texts are sorted
  by length); a one-sentence message's vector also goes to the summarizer's sentence cache;
- ``recall`` ranks a user's units for a request (actors/memory/recall/retrieval.py), leaving
  out the current session's turns that the request already gets verbatim, and messages whose
  every fact has been superseded since (they would bring an outdated value back);
- ``search`` is the handle API behind the benchmark's ablation rows (one mode at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from actors.memory.embedding import ShardEmbeddings
from actors.memory.learning.absorb import UserMemory
from actors.memory.learning.extraction import as_memory_query
from actors.memory.recall.dates import resolve_mentions
from actors.memory.recall.retrieval import MODES, RecalledUnit, rank_units
from actors.memory.units import MemoryUnit, UserUnits
from actors.memory.users import MemoryUsers
from cluster.config.memory import MemoryConfig
from cluster.errors import InvalidRequestError
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.unit_memory")

EMBED_BATCH = 128


class UnitMemory:
    """Memory units in a shard (see the module docstring)."""

    def __init__(
        self,
        config: MemoryConfig,
        users: MemoryUsers,
        embeddings: ShardEmbeddings,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.config = config
        self.users = users
        self.embeddings = embeddings
        self.count_tokens = count_tokens

    def absorb(
        self, memory: UserMemory, session_id: str, turn_id: int, messages: Sequence[dict[str, Any]], at: float
    ) -> int:
        units = memory.units
        if units is None or units.knows(session_id, turn_id):
            return 0
        added = 0
        for index, message in enumerate(messages):
            text = str(message.get("content") or "").strip()
            if not text or message.get("role") == "system":
                continue
            speaker = message.get("name") or None
            unit = MemoryUnit(0, session_id, turn_id, index, str(message.get("role", "user")), speaker,
                              text, at, resolve_mentions(text, at))
            unit.tokens = self.count_tokens(unit.line)
            units.add(unit)
            added += 1
        return added

    def has_unembedded(self) -> bool:
        return any(m.units is not None and m.units.unembedded for m in self.users.loaded())

    async def embed_pending(self) -> int:
        """Embed every unit still without a vector, the queued turns of all users together
        (calls of up to ``EMBED_BATCH`` texts: one user's turn rarely fills one); returns how
        many (the caller schedules the write). If a call fails, its units are embedded one by
        one: a unit the embedder refuses stays found by its words only, the others get their
        vectors."""
        done = 0
        while True:
            # the units object is kept with each unit: a user's units may be replaced (the
            # user's memory deleted) while the batch is embedded, and the vectors then go to
            # the units they were taken from, not to new units that reuse the keys
            batch: list[tuple[UserMemory, UserUnits, MemoryUnit]] = []
            for memory in self.users.loaded():
                units = memory.units
                if units is not None and units.unembedded:
                    taken = units.take_unembedded(EMBED_BATCH - len(batch))
                    batch += [(memory, units, unit) for unit in taken]
                if len(batch) >= EMBED_BATCH:
                    break
            if not batch:
                return done
            embedded, vectors = await self._embed_units([unit for _, _, unit in batch])
            owners = {id(unit): (memory, units) for memory, units, unit in batch}
            by_units: dict[int, tuple[UserMemory, UserUnits, list[MemoryUnit], list[np.ndarray]]] = {}
            for unit, vector in zip(embedded, vectors):
                memory, units = owners[id(unit)]
                entry = by_units.setdefault(id(units), (memory, units, [], []))
                entry[2].append(unit)
                entry[3].append(vector)
            for memory, units, taken, taken_vectors in by_units.values():
                stacked = np.asarray(taken_vectors, dtype=np.float32)
                units.set_vectors(taken, stacked)
                self.embeddings.share_unit_vectors(taken, stacked)
                memory.dirty = True
                done += len(taken)

    async def _embed_units(self, batch: list[MemoryUnit]) -> tuple[list[MemoryUnit], np.ndarray]:
        try:
            return batch, await self.embeddings.embed([u.line for u in batch])
        except Exception:
            log.warning("embedding a batch of memory units failed: embedding them one by one", exc_info=True)
        embedded, vectors = [], []
        for unit in batch:
            try:
                vectors.append((await self.embeddings.embed([unit.line]))[0])
                embedded.append(unit)
            except Exception:
                log.error("a memory unit could not be embedded: it is found by its words only",
                          exc_info=True, extra={"session": unit.session_id, "turn": unit.turn_id})
        return embedded, np.asarray(vectors, dtype=np.float32)

    def recall(
        self, memory: UserMemory, session: Any, query: str, vector: np.ndarray | None, mode: str | None = None
    ) -> list[RecalledUnit]:
        units = memory.units
        if units is None or not len(units) or not query:
            return []
        superseded = memory.longterm.superseded
        sid, through = (session.session_id, session.summarized_through) if session is not None else (None, 0)

        def exclude(unit: MemoryUnit) -> bool:
            # the session's unsummarized turns come verbatim already; a message whose every
            # fact was superseded since would bring an outdated value back (as summaries never do)
            if unit.session_id == sid and unit.turn_id > through:
                return True
            return bool(unit.facts) and all(f in superseded for f in unit.facts)

        return rank_units(units, query, vector, self.config.units, mode=mode, exclude=exclude)

    async def search(
        self, tenant: str, user: str, query: str, *, mode: str | None = None, limit: int = 256,
        session_id: str | None = None,
    ) -> list[RecalledUnit]:
        """The user's units for ``query`` in retrieval ``mode`` (default: the config's)."""
        if mode is not None and mode not in MODES:
            raise InvalidRequestError(f"mode={mode!r} is not one of {', '.join(MODES)}", param="mode")
        memory = await self.users.get(tenant, user)
        vector = None
        if (mode or self.config.units.mode) != "lexical":
            vector = (await self.embeddings.embed([as_memory_query(query)]))[0]
        session = memory.episodes.sessions.get(session_id) if session_id else None
        return self.recall(memory, session, query, vector, mode)[:limit]


__all__ = ["UnitMemory", "EMBED_BATCH"]
