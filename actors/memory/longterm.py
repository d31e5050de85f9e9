"""Long-term semantic memory of one user: facts with embeddings, dedup, ranking, cleanup.

``UserLongTerm`` owns one (tenant, user)'s records, the vector index of the active ones and
the slot table used to detect contradictions. It is plain synchronous code: the shard calls it
on its event loop thread only (embeddings are computed before, off the loop).

Ranking (docs/memory.md, "Prioritization"): for a query,
``score = w_sim * similarity + w_imp * importance + w_rec * recency + w_acc * access`` with
``recency = 0.5 ** (age / half_life)`` (age since the fact was last confirmed or used) and
``access = log(1 + uses) / log(101)`` capped at 1. Eviction uses the same terms without the
similarity: the lowest-priority active facts go first when a user is over capacity.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from actors.memory.learning.dedup import Plan, decide
from actors.memory.learning.extraction import FactCandidate
from actors.memory.recall.index import VectorIndex, quantize
from actors.memory.records import Decision, MemoryRecord, new_memory_id
from cluster.config.memory import MemoryConfig

DECISION_COUNTERS = ("candidates", "add", "update", "supersede", "none")


@dataclass(frozen=True)
class Ranked:
    record: MemoryRecord
    similarity: float
    score: float


class UserLongTerm:
    """The long-term facts of one user (see the module docstring)."""

    def __init__(self, tenant: str, user: str, dimension: int, config: MemoryConfig) -> None:
        self.tenant = tenant
        self.user = user
        self.config = config
        self.records: dict[str, MemoryRecord] = {}
        self.index = VectorIndex(dimension, config.index)
        self._by_key: dict[int, str] = {}
        self._slots: dict[str, set[str]] = {}
        self.next_key = 1
        self.counters: Counter[str] = Counter()
        self.superseded: set[str] = set()  # ids of history records (kept current for recall)
        self._record_bytes = 0

    # -- views ------------------------------------------------------------------------------

    def active(self) -> Iterator[MemoryRecord]:
        return (r for r in self.records.values() if r.active)

    def history(self) -> Iterator[MemoryRecord]:
        return (r for r in self.records.values() if not r.active)

    @property
    def active_count(self) -> int:
        return len(self._by_key)  # active records (read-only loads may hold no vectors)

    def nbytes(self) -> int:
        """Records (kept as a running total) plus stored embeddings and the graph."""
        return self._record_bytes + self.index.nbytes()

    def recency(self, record: MemoryRecord, now: float) -> float:
        age = max(0.0, now - max(record.updated_at, record.last_accessed_at))
        return 0.5 ** (age / self.config.retrieval.recency_half_life_s)

    @staticmethod
    def access(record: MemoryRecord) -> float:
        return min(1.0, math.log1p(record.access_count) / math.log(101))

    def priority(self, record: MemoryRecord, now: float) -> float:
        """How much a fact is worth keeping, without a query (eviction order)."""
        r = self.config.retrieval
        return (
            r.weight_importance * record.importance
            + r.weight_recency * self.recency(record, now)
            + r.weight_access * self.access(record)
        )

    # -- writes -----------------------------------------------------------------------------

    def apply(
        self, candidate: FactCandidate, embedding: np.ndarray, source: str, now: float
    ) -> Decision:
        """Deduplicate ``candidate`` against the active facts and record the outcome."""
        neighbours = [
            (self.records[self._by_key[key]], similarity)
            for key, similarity in self.index.search(embedding, self.config.dedup.neighbours)
        ]
        same_slot = []
        if candidate.slot is not None:
            same_slot = [self.records[i] for i in sorted(self._slots.get(candidate.slot, ()))]
        plan = decide(candidate, source, same_slot, neighbours, self.config.dedup)
        self.counters["candidates"] += 1
        self.counters[plan.action] += 1
        return self._carry_out(plan, candidate, embedding, source, now)

    def _carry_out(
        self, plan: Plan, candidate: FactCandidate, embedding: np.ndarray, source: str, now: float
    ) -> Decision:
        if plan.action == "none":
            assert plan.target is not None
            return Decision("none", candidate.text, plan.target.id, (plan.target.id,),
                            plan.similarity, plan.reason, source)
        if plan.action == "update":
            target = plan.target
            assert target is not None
            if source and source not in target.source_turns:
                target.source_turns.append(source)
                self._record_bytes += len(source)
            target.confirmations += 1
            target.importance = min(1.0, max(target.importance, candidate.importance)
                                     + self.config.dedup.importance_bump)
            target.updated_at = now
            if target.slot is None and candidate.slot is not None:  # a manual fact gains a slot
                target.slot, target.value = candidate.slot, candidate.value
                self._slots.setdefault(candidate.slot, set()).add(target.id)
            return Decision("update", candidate.text, target.id, (target.id,),
                            plan.similarity, plan.reason, source)
        record = self.add_record(
            candidate.text, candidate.kind, candidate.importance, embedding, now,
            slot=candidate.slot, value=candidate.value, sources=[source] if source else [],
        )
        for old in plan.superseded:
            self._supersede(old, record, now)
        targets = tuple(r.id for r in plan.superseded)
        return Decision(plan.action, candidate.text, record.id, targets, plan.similarity,
                        plan.reason, source)

    def add_record(
        self,
        text: str,
        kind: str,
        importance: float,
        embedding: np.ndarray,
        now: float,
        *,
        slot: str | None = None,
        value: str = "",
        sources: list[str] | None = None,
        origin: str = "extracted",
    ) -> MemoryRecord:
        record = MemoryRecord(
            id=new_memory_id(), tenant=self.tenant, user=self.user, text=text, kind=kind,
            importance=importance, created_at=now, updated_at=now, last_accessed_at=now,
            slot=slot, value=value, source_turns=list(sources or []), origin=origin,
            key=self.next_key,
        )
        self.next_key += 1
        self.insert(record, embedding)
        return record

    def insert(self, record: MemoryRecord, embedding: np.ndarray | None, stored: bool = False) -> None:
        """Put a record in (from ``add_record`` or a load); active ones need an embedding."""
        self.records[record.id] = record
        self._record_bytes += record.nbytes()
        self.next_key = max(self.next_key, record.key + 1)
        if not record.active:
            self.superseded.add(record.id)
            return
        self._by_key[record.key] = record.id
        if record.slot is not None:
            self._slots.setdefault(record.slot, set()).add(record.id)
        if embedding is not None:
            if stored:
                self.index.add_stored(record.key, embedding)
            else:
                self.index.add(record.key, embedding)

    def _supersede(self, old: MemoryRecord, new: MemoryRecord, now: float) -> None:
        self._unindex(old)
        old.status = "superseded"
        old.superseded_by = new.id
        old.superseded_at = now
        new.supersedes.append(old.id)
        self.superseded.add(old.id)

    def _unindex(self, record: MemoryRecord) -> None:
        self.index.remove(record.key)
        self._by_key.pop(record.key, None)
        if record.slot is not None:
            ids = self._slots.get(record.slot)
            if ids is not None:
                ids.discard(record.id)
                if not ids:
                    del self._slots[record.slot]

    def delete(self, memory_id: str) -> bool:
        """Remove a record for good (active or history)."""
        record = self.records.pop(memory_id, None)
        if record is None:
            return False
        self._record_bytes -= record.nbytes()
        if record.active:
            self._unindex(record)
        self.superseded.discard(memory_id)
        return True

    def delete_all(self) -> int:
        count = len(self.records)
        for memory_id in list(self.records):
            self.delete(memory_id)
        return count

    # -- reads ------------------------------------------------------------------------------

    def search(
        self, query: np.ndarray, k: int, now: float, *, touch: bool = True
    ) -> list[Ranked]:
        """The ``k`` best active facts for ``query`` by ranking score; ``touch`` counts a use."""
        r = self.config.retrieval
        found = []
        for key, similarity in self.index.search(query, max(k, r.candidates)):
            if similarity < r.min_similarity:
                continue
            record = self.records[self._by_key[key]]
            score = (
                r.weight_similarity * similarity
                + r.weight_importance * record.importance
                + r.weight_recency * self.recency(record, now)
                + r.weight_access * self.access(record)
            )
            found.append(Ranked(record, similarity, score))
        found.sort(key=lambda x: x.score, reverse=True)
        best = found[:k]
        if touch:
            for item in best:
                item.record.access_count += 1
                item.record.last_accessed_at = now
        return best

    def load(
        self,
        records: list[MemoryRecord],
        stored: dict[str, np.ndarray],
        graph: bytes | None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ) -> bool:
        """Fill an empty store from saved records and their stored vectors; a saved graph is
        used when it matches, else rebuilt (returns whether the graph was restored). Active
        records without a vector (another embedder wrote them) are embedded again."""
        missing = [r for r in records if r.active and r.id not in stored]
        if missing:
            if embed is None:
                raise ValueError("records without embeddings and no embedder to compute them")
            vectors = embed([r.text for r in missing])
            stored = {**stored, **{r.id: quantize(v[None, :], self.index.dtype)[0]
                                   for r, v in zip(missing, vectors)}}
        for record in records:
            self.insert(record, None)
        active = [r for r in records if r.active]
        if active:
            keys = np.array([r.key for r in active], dtype=np.int64)
            self.index.add_many_stored(keys, np.stack([stored[r.id] for r in active]), build_graph=False)
        restored = graph is not None and self.index.restore_graph(graph)
        if not restored:
            self.index.ensure_graph()
        return restored

    # -- cleanup ----------------------------------------------------------------------------

    def cleanup(self, now: float) -> dict[str, int]:
        """TTL, then capacity (lowest priority first), then the history cap."""
        capacity = self.config.capacity
        expired = evicted = dropped = 0
        if capacity.ttl_s is not None:
            cutoff = now - capacity.ttl_s
            for record in list(self.records.values()):
                last = record.superseded_at if not record.active else max(
                    record.updated_at, record.last_accessed_at)
                if (last or 0.0) < cutoff:
                    self.delete(record.id)
                    expired += 1
        excess = self.active_count - capacity.max_memories_per_user
        if excess > 0:
            ranked = sorted(self.active(), key=lambda rec: (self.priority(rec, now), rec.created_at))
            for record in ranked[:excess]:
                self.delete(record.id)
                evicted += 1
        history = sorted(self.history(), key=lambda rec: rec.superseded_at or 0.0)
        for record in history[: max(0, len(history) - capacity.max_history_per_user)]:
            self.delete(record.id)
            dropped += 1
        self.counters["expired"] += expired
        self.counters["evicted"] += evicted
        return {"expired": expired, "evicted": evicted, "history_dropped": dropped}


__all__ = ["UserLongTerm", "Ranked", "DECISION_COUNTERS"]
