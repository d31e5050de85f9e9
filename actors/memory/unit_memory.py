"""The memory shard's half of memory units: keep every absorbed message, embed it, find it.

Mixed into ``MemoryShard`` (which provides ``users``, ``clock``, ``config``, ``count_tokens``,
``_embed`` and ``_schedule_flush``):

- ``_absorb_units`` turns the messages of an absorbed turn into units at once (lexical index
  and resolved dates included: the next request can find them by their words);
- ``_embed_units`` runs in the shard's background worker before each job: it embeds the
  units still without a vector, in batches (a batch pads little: texts are sorted by length);
  a one-sentence message's vector also goes to the summarizer's sentence cache;
- ``_recall_units`` ranks a user's units for a request (actors/memory/recall/retrieval.py), leaving
  out the current session's turns that the request already gets verbatim, and messages whose
  every fact has been superseded since (they would bring an outdated value back);
- ``search_units`` is the handle API behind the benchmark's ablation rows (one mode at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.memory.episodic import ROLE_LABEL
from actors.memory.learning.extraction import split_sentences
from actors.memory.recall.dates import resolve_mentions
from actors.memory.recall.retrieval import MODES, RecalledUnit, rank_units
from actors.memory.units import MemoryUnit
from cluster.errors import InvalidRequestError

SENTENCE_CACHE = 16_384  # as the shard's own sentence cache (actors/memory/shard.py)

EMBED_BATCH = 128

class UnitMemory:
    """Memory units in a shard (see the module docstring)."""

    def _absorb_units(
        self, memory: Any, session_id: str, turn_id: int, messages: Sequence[dict[str, Any]], at: float
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
            unit.tokens = self.count_tokens(unit.line)  # type: ignore[attr-defined]
            units.add(unit)
            added += 1
        return added

    def _has_unembedded(self) -> bool:
        return any(m.units is not None and m.units.unembedded for m in self.users.loaded())  # type: ignore[attr-defined]

    async def _embed_units(self) -> int:
        """Embed every unit still without a vector (batches of ``EMBED_BATCH``)."""
        done = 0
        for memory in self.users.loaded():  # type: ignore[attr-defined]
            units = memory.units
            while units is not None and units.unembedded:
                batch = units.take_unembedded(EMBED_BATCH)
                if not batch:
                    continue
                vectors = await self._embed([u.line for u in batch])  # type: ignore[attr-defined]
                units.set_vectors(batch, vectors)
                self._share_with_summaries(batch, vectors)
                memory.dirty = True
                done += len(batch)
        if done:
            self._schedule_flush()  # type: ignore[attr-defined]
        return done

    def _share_with_summaries(self, batch: list[MemoryUnit], vectors: np.ndarray) -> None:
        """A one-sentence message is also a summary candidate ("User: <sentence>"): its unit
        vector is lent to the summarizer's sentence cache, so it is not embedded twice."""
        cache = self._sentence_vectors  # type: ignore[attr-defined]
        for unit, vector in zip(batch, vectors):
            sentences = split_sentences(unit.text)
            if len(sentences) == 1:
                key = f"{ROLE_LABEL.get(unit.role, 'User')}: {sentences[0]}"
                cache[key] = vector.astype(np.float16)
                cache.move_to_end(key)
        while len(cache) > SENTENCE_CACHE:
            cache.popitem(last=False)

    def _recall_units(
        self, memory: Any, session: Any, query: str, vector: np.ndarray | None, mode: str | None = None
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

        return rank_units(units, query, vector, self.config.units, mode=mode, exclude=exclude)  # type: ignore[attr-defined]

    async def search_units(
        self, tenant: str, user: str, query: str, *, mode: str | None = None, limit: int = 256,
        session_id: str | None = None,
    ) -> list[RecalledUnit]:
        """The user's units for ``query`` in retrieval ``mode`` (default: the config's)."""
        if mode is not None and mode not in MODES:
            raise InvalidRequestError(f"mode={mode!r} is not one of {', '.join(MODES)}", param="mode")
        from actors.memory.learning.extraction import as_memory_query

        memory = await self._user(tenant, user)  # type: ignore[attr-defined]
        vector = None
        if (mode or self.config.units.mode) != "lexical":  # type: ignore[attr-defined]
            vector = (await self._embed([as_memory_query(query)]))[0]  # type: ignore[attr-defined]
        session = memory.episodes.sessions.get(session_id) if session_id else None
        return self._recall_units(memory, session, query, vector, mode)[:limit]


__all__ = ["UnitMemory", "EMBED_BATCH"]
