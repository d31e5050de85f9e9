"""Semantic deduplication: mem0's add / update / delete(supersede) / none decisions."""

from __future__ import annotations

import numpy as np
import pytest

from actors.memory.learning.dedup import decide
from actors.memory.learning.extraction import FactCandidate
from actors.memory.longterm import UserLongTerm
from actors.memory.records import MemoryRecord
from cluster.config.memory import DedupConfig, MemoryConfig


def vec(*components: float, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[: len(components)] = components
    return v / np.linalg.norm(v)


def record(id_: str, text: str, slot: str | None = None, value: str = "", sources=()) -> MemoryRecord:
    return MemoryRecord(id_, "t", "u", text, "identity", 0.8, 0.0, 0.0, 0.0, slot=slot, value=value,
                        source_turns=list(sources))


def fact(text: str, slot: str | None = None, value: str = "", kind: str = "identity") -> FactCandidate:
    return FactCandidate(text, kind, 0.8, slot, value)


CONFIG = DedupConfig(update_similarity=0.85)


def test_same_slot_same_value_updates_and_new_value_supersedes():
    paris = record("m1", "The user lives in Paris.", "location", "Paris")
    plan = decide(fact("The user lives in paris.", "location", "the Paris"), "s#2", [paris], [(paris, 0.97)], CONFIG)
    assert (plan.action, plan.target) == ("update", paris)
    plan = decide(fact("The user lives in Berlin.", "location", "Berlin"), "s#3", [paris], [(paris, 0.63)], CONFIG)
    assert plan.action == "supersede" and plan.superseded == (paris,)


def test_paraphrase_updates_and_distinct_facts_add():
    dog = record("m1", "The user has a dog named Rex.")
    assert decide(fact("Rex is the user's dog."), "s#1", [], [(dog, 0.91)], CONFIG).action == "update"
    assert decide(fact("The user has a cat named Tom."), "s#1", [], [(dog, 0.72)], CONFIG).action == "add"
    assert decide(fact("Anything"), "s#1", [], [], CONFIG).action == "add"


def test_close_facts_in_different_slots_never_merge():
    sister = record("m1", "The user's sister's name is Jane.", "attr:sister's name", "Jane")
    plan = decide(fact("The user's brother's name is Jane.", "attr:brother's name", "Jane"), "s#4", [],
                  [(sister, 0.95)], CONFIG)
    assert plan.action == "add"


def test_the_same_turn_absorbed_twice_changes_nothing():
    tea = record("m1", "The user likes tea.", sources=["s#1"])
    assert decide(fact("The user likes tea."), "s#1", [], [(tea, 1.0)], CONFIG).action == "none"
    assert decide(fact("The user likes tea."), "s#9", [], [(tea, 1.0)], CONFIG).action == "update"


class TableEmbedding:
    """Fixed vectors per text (the tests choose the similarities)."""

    def __init__(self) -> None:
        self.table = {
            "The user lives in Paris.": vec(1, 0),
            "The user lives in Berlin.": vec(1, 0.6),
            "The user has a dog named Rex.": vec(0, 1),
            "Rex is the user's dog.": vec(0.1, 1),  # cosine ~0.99 with the one above
            "The user likes tea.": vec(0, 0, 1),
        }


@pytest.fixture
def store() -> tuple[UserLongTerm, TableEmbedding]:
    return UserLongTerm("t", "u", 8, MemoryConfig(embedder="hashing")), TableEmbedding()


def apply(store, text, slot=None, value="", source="s#0", now=1.0):
    longterm, table = store
    return longterm.apply(fact(text, slot, value), table.table[text], source, now)


def test_supersede_keeps_history_out_of_search(store):
    longterm, table = store
    first = apply(store, "The user lives in Paris.", "location", "Paris", "s#1", 1.0)
    second = apply(store, "The user lives in Berlin.", "location", "Berlin", "s#2", 2.0)
    assert (first.action, second.action) == ("add", "supersede")
    old, new = longterm.records[first.memory_id], longterm.records[second.memory_id]
    assert (old.status, old.superseded_by, old.superseded_at) == ("superseded", new.id, 2.0)
    assert new.supersedes == [old.id] and second.targets == (old.id,)
    assert longterm.active_count == 1 and longterm.superseded == {old.id}
    found = longterm.search(table.table["The user lives in Paris."], 5, 3.0)
    assert [r.record.id for r in found] == [new.id]  # history is never retrieved


def test_paraphrase_merges_sources_and_bumps_importance(store):
    longterm, _ = store
    first = apply(store, "The user has a dog named Rex.", source="s#1")
    again = apply(store, "Rex is the user's dog.", source="s#7", now=5.0)
    assert again.action == "update" and again.memory_id == first.memory_id
    merged = longterm.records[first.memory_id]
    assert merged.source_turns == ["s#1", "s#7"]
    assert merged.confirmations == 1 and merged.importance == pytest.approx(0.85)
    assert merged.updated_at == 5.0 and longterm.active_count == 1
    assert dict(longterm.counters) == {"candidates": 2, "add": 1, "update": 1}
