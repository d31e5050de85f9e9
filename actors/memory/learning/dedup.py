"""Semantic deduplication: what to do with a new fact, given the user's existing ones.

The decisions are mem0's (add / update / delete / none), decided here without a model:

1. **slot match** (the fact holds one value at a time, e.g. ``location``): an active fact in
   the same slot with the same normalized value is confirmed (``update``); with another value
   it is contradicted: the old fact is **superseded** (mem0's delete, but kept as history with
   ``superseded_by``) and the new one added.
2. **paraphrase**: otherwise, the nearest active fact with cosine similarity at or above
   ``dedup.update_similarity`` whose slot does not differ is updated (sources merged,
   importance bumped) instead of adding a copy.
3. the same text from a source turn already recorded on that fact changes nothing (``none``:
   a turn absorbed twice).
4. otherwise ``add``.

``decide`` is pure (records and similarities in, a ``Plan`` out); ``UserLongTerm.apply``
carries the plan out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actors.memory.learning.extraction import FactCandidate, normalize_value
from actors.memory.records import Action, MemoryRecord
from cluster.config.memory import DedupConfig


@dataclass(frozen=True)
class Plan:
    action: Action
    target: MemoryRecord | None = None  # the record updated (update/none)
    superseded: tuple[MemoryRecord, ...] = ()  # records the new fact replaces (supersede)
    similarity: float = 0.0
    reason: str = ""


def _same_text(a: str, b: str) -> bool:
    return normalize_value(a) == normalize_value(b)


def decide(
    candidate: FactCandidate,
    source: str,
    same_slot: Sequence[MemoryRecord],
    neighbours: Sequence[tuple[MemoryRecord, float]],
    config: DedupConfig,
) -> Plan:
    """The plan for ``candidate`` (``same_slot``: active records in its slot; ``neighbours``:
    nearest active records with their cosine similarity, best first)."""
    best = neighbours[0] if neighbours else None
    for record, similarity in neighbours:
        if _same_text(record.text, candidate.text) and source in record.source_turns:
            return Plan("none", record, similarity=similarity, reason="already recorded from this turn")
    if candidate.slot is not None and same_slot:
        value = candidate.normalized_value
        matching = [r for r in same_slot if normalize_value(r.value) == value]
        if matching:
            target = matching[0]
            similarity = next((s for r, s in neighbours if r.id == target.id), 1.0)
            return Plan("update", target, similarity=similarity, reason=f"same {candidate.slot}")
        return Plan(
            "supersede",
            superseded=tuple(same_slot),
            similarity=max((s for r, s in neighbours if r in same_slot), default=0.0),
            reason=f"new value for {candidate.slot}",
        )
    if best is not None:
        record, similarity = best
        slots_agree = record.slot is None or candidate.slot is None or record.slot == candidate.slot
        if similarity >= config.update_similarity and slots_agree:
            return Plan("update", record, similarity=similarity, reason="paraphrase")
    return Plan("add", similarity=best[1] if best else 0.0, reason="new fact")


__all__ = ["Plan", "decide"]
