"""The absorb worker's batches: queued turns are embedded together, applied in order, durably,
and a turn that fails does not take the others of its batch with it."""

from __future__ import annotations

import asyncio

import pytest

from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer
from tests.support.memory_fixtures import turn


class RecordingEmbedder(HashingEmbedder):
    """Records each call's texts; refuses any batch holding ``refuse`` (a broken input)."""

    def __init__(self, refuse: str | None = None) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.refuse = refuse

    def embed(self, texts):
        self.calls.append(list(texts))
        if self.refuse and any(self.refuse in t for t in texts):
            raise ValueError(f"cannot embed {self.refuse}")
        return super().embed(texts)


class FailingExtractor:
    """The rule extractor, except that it fails on one message."""

    def __init__(self, inner, fail_on: str) -> None:
        self.inner, self.fail_on = inner, fail_on

    def extract(self, messages):
        if any(self.fail_on in m["content"] for m in messages):
            raise RuntimeError("extraction failed")
        return self.inner.extract(messages)


def shard(embedder, **config) -> MemoryShard:
    return MemoryShard(MemoryConfig(embedder="hashing", **config), tokenizer=ByteTokenizer(), embedder=embedder)


STATEMENTS = ["I live in Paris.", "My favourite drink is green tea.", "I moved to Berlin last month.",
              "My favourite colour is blue.", "I have a dog named Rex.", "I work as a nurse."]


def absorb_all(s: MemoryShard, sessions: dict[str, list[str]], wait: bool = True):
    """Every turn absorbed at once, as the ingress does after replies (concurrent calls)."""
    calls = [s.absorb_turn("t", "u", sid, i, turn(text), wait=wait)
             for sid, texts in sessions.items() for i, text in enumerate(texts)]
    return asyncio.gather(*calls, return_exceptions=True)


def test_queued_turns_are_embedded_in_one_batch_and_applied_in_order():
    async def go():
        embedder = RecordingEmbedder()
        s = shard(embedder)
        results = await absorb_all(s, {"s1": STATEMENTS, "s2": ["I live in Rome.", "I work as a pilot."]})
        await s.drain()
        # units of all 8 turns (user and assistant messages) in one call, the facts of all in one
        unit_calls = [c for c in embedder.calls if any(t.startswith("User: ") for t in c)]
        assert [len(c) for c in unit_calls] == [16]
        fact_calls = [c for c in embedder.calls if any(t.startswith("The user") for t in c)]
        assert len(fact_calls) == 1 and len(fact_calls[0]) == len(STATEMENTS) + 2
        # applied in queue order: each turn's own decision, Paris then Berlin superseding it,
        # then s2's Rome superseding Berlin
        assert [[d["action"] for d in r["decisions"]] for r in results[:3]] == [["add"], ["add"], ["supersede"]]
        assert [d["action"] for d in results[6]["decisions"]] == ["supersede"]
        listed = await s.list_memories("t", "u", include_history=True)
        status = {m["text"]: m["status"] for m in listed["data"]}
        assert status["The user lives in Rome."] == "active"
        assert status["The user lives in Paris."] == status["The user lives in Berlin."] == "superseded"
        session = s.loaded_users()[0].episodes.sessions["s1"]
        turn_ids = [t.turn_id for t in (*session.pending, *session.window)]
        assert turn_ids == sorted(turn_ids) and all(t.analysed for t in session.window)

    asyncio.run(go())


def test_one_turn_each_of_many_users_is_embedded_in_one_call():
    async def go():
        embedder = RecordingEmbedder()
        s = shard(embedder)
        users = [f"user-{i}" for i in range(5)]
        for user in users:
            await s.users.get("t", user)  # loaded before, as users with history are
        results = await asyncio.gather(*[
            s.absorb_turn("t", user, f"s-{user}", 0, turn(f"I work as a {job}."), wait=True)
            for user, job in zip(users, ["nurse", "pilot", "baker", "judge", "chef"])])
        assert all([d["action"] for d in r["decisions"]] == ["add"] for r in results)
        unit_calls = [c for c in embedder.calls if any(t.startswith("User: ") for t in c)]
        assert [len(c) for c in unit_calls] == [10]  # user and assistant message of 5 users
        for user, job in zip(users, ["nurse", "pilot", "baker", "judge", "chef"]):
            memory = s.users.find(("t", user))
            assert len(memory.units.dense) == 2
            found = await s.search_units("t", user, f"What is my job as a {job}?", mode="dense")
            assert f"I work as a {job}." in found[0].line

    asyncio.run(go())


def test_a_failing_turn_fails_alone_and_its_batch_is_applied():
    async def go():
        embedder = RecordingEmbedder()
        s = shard(embedder)
        s.absorber.extractor = FailingExtractor(s.absorber.extractor, "dog")
        results = await absorb_all(s, {"s1": STATEMENTS})
        await s.drain()
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        assert failed == [STATEMENTS.index("I have a dog named Rex.")]
        assert str(results[failed[0]]) == "extraction failed"
        texts = {m["text"] for m in (await s.list_memories("t", "u"))["data"]}
        assert {"The user works as a nurse.", "The user lives in Berlin."} <= texts
        assert not any("dog" in t for t in texts)
        # the worker is still alive: the next turn is analysed
        again = await s.absorb_turn("t", "u", "s1", 10, turn("I have a cat named Tom."), wait=True)
        assert [d["action"] for d in again["decisions"]] == ["add"]

    asyncio.run(go())


def test_a_text_the_embedder_refuses_costs_only_its_own_vector_and_fact():
    async def go():
        embedder = RecordingEmbedder(refuse="Zanzibar")
        s = shard(embedder)
        statements = [*STATEMENTS[:2], "I live in Zanzibar.", *STATEMENTS[3:]]
        results = await absorb_all(s, {"s1": statements})
        await s.drain()
        assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [2]
        units = s.loaded_users()[0].units
        refused = [u.key for u in units.units.values() if "Zanzibar" in u.text]
        assert len(units.dense) == len(units) - len(refused) == 2 * len(statements) - 1
        found = await s.search_units("t", "u", "Zanzibar", mode="lexical")
        assert [u.key for u in found] == refused  # still found by its words
        texts = {m["text"] for m in (await s.list_memories("t", "u"))["data"]}
        assert "The user works as a nurse." in texts and not any("Zanzibar" in t for t in texts)

    asyncio.run(go())


def test_a_batch_absorbed_in_the_background_is_written_and_loaded_again(tmp_path):
    async def go():
        config = {"storage_uri": str(tmp_path), "persist_interval_s": 3600.0}
        s = shard(RecordingEmbedder(), **config)
        acks = await absorb_all(s, {"s1": STATEMENTS, "s2": ["I live in Rome."]}, wait=False)
        assert all(a["queued"] for a in acks)
        await s.close()  # drains the queue, then writes every user
        again = shard(RecordingEmbedder(), **config)
        memory = await again.users.get("t", "u")
        assert len(memory.units) == len(memory.units.dense) == 2 * (len(STATEMENTS) + 1)
        session = memory.episodes.sessions["s1"]
        assert [t.turn_id for t in (*session.pending, *session.window)] == list(range(len(STATEMENTS)))
        listed = await again.list_memories("t", "u")
        assert "The user lives in Rome." in {m["text"] for m in listed["data"]}
        await again.close()

    asyncio.run(go())


@pytest.mark.parametrize("deleted", ["before", "during"])
def test_a_session_forgotten_while_its_batch_waits_leaves_nothing(deleted):
    async def go():
        s = shard(RecordingEmbedder())
        pending = absorb_all(s, {"s1": STATEMENTS[:3], "s2": STATEMENTS[3:]})
        if deleted == "during":
            await asyncio.sleep(0)  # the worker has taken the batch
        await s.forget_session("t", "s1")
        await pending
        await s.drain()
        memory = s.loaded_users()[0]
        assert "s1" not in memory.episodes.sessions
        assert all(u.session_id == "s2" for u in memory.units.units.values())
        texts = {m["text"] for m in (await s.list_memories("t", "u"))["data"]}
        assert "The user works as a nurse." in texts  # s2's facts stay

    asyncio.run(go())
