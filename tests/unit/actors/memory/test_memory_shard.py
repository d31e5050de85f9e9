"""MemoryShard: the levels with canned turns, background absorbing, cleanup, isolation."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.memory.shard import MemoryShard, shard_for
from cluster.config.memory import MemoryConfig
from cluster.errors import CapacityError, ConfigError, InvalidRequestError, NotFoundError
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer
from tests.support.memory_fixtures import SMALL, SlowEmbedder, turn


def run(coro):
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def shard(embedder=None, clock=None, **config) -> MemoryShard:
    config.setdefault("embedder", "hashing")
    return MemoryShard(MemoryConfig(**config), tokenizer=ByteTokenizer(), embedder=embedder or HashingEmbedder(),
                       clock=clock or time.time)


def test_window_pending_and_a_bounded_summary_hierarchy():
    async def go():
        s = shard(**SMALL)
        for i in range(24):
            await s.absorb_turn("t", "u", "s1", i, turn(f"Topic {i} is about gardening and roses number {i}."),
                                wait=True)
        session = s.loaded_users()[0].episodes.sessions["s1"]
        window_ids = [t.turn_id for t in (*session.pending, *session.window)]
        assert window_ids == list(range(session.summarized_through + 1, 24))  # nothing missing
        assert sum(t.tokens for t in session.window) <= 120 or len(session.window) == 1
        assert len(session.pending) < 2
        levels = [n.level for n in session.summaries]
        assert max(levels) >= 3 and all(levels.count(level) < 2 for level in set(levels))
        assert [n.first_turn for n in session.summaries] == sorted(n.first_turn for n in session.summaries)
        for node in session.summaries:
            assert sum(len(x.text) + 1 for x in node.sentences) <= 60
        recall = await s.recall("t", "u", "s1", "roses?")
        assert recall.turns == session.recent_turns()
        assert recall.summarized_through == session.summarized_through
        assert await s.absorb_turn("t", "u", "s1", 3, turn("again")) == {
            "queued": False, "reason": "turn 3 of s1 was absorbed already"}

    run(go())


def test_long_term_facts_dedup_and_superseded_sentences_leave_summaries():
    async def go():
        s = shard(**SMALL)
        script = ["I live in Paris.", "My favourite drink is green tea.", "Green tea is my favourite drink.",
                  "Tell me about volcanoes.", "What is a haiku?", "I moved to Berlin last month.",
                  "Explain tides please.", "How do magnets work?", "Why is the sky blue?"]
        actions = []
        for i, text in enumerate(script):
            result = await s.absorb_turn("t", "u", "s1", i, turn(text), wait=True)
            actions.append([d["action"] for d in result["decisions"]])
        assert actions[:3] == [["add"], ["add"], ["update"]] and actions[5] == ["supersede"]
        recall = await s.recall("t", "u", "s1", "Where do I live?")
        assert "The user lives in Berlin." in [f.text for f in recall.facts]
        assert all("Paris" not in f.text for f in recall.facts)
        assert all("Paris" not in sentence for sentence in recall.session_summary)
        history = await s.list_memories("t", "u", include_history=True)
        paris = next(m for m in history["data"] if "Paris" in m["text"])
        assert paris["status"] == "superseded" and paris["superseded_by"]
        drink = next(m for m in history["data"] if "drink" in m["text"])
        assert drink["source_turns"] == ["s1#1", "s1#2"] and drink["confirmations"] == 1

    run(go())


def test_new_session_gets_long_term_facts_and_the_user_summary():
    async def go():
        s = shard(**SMALL)
        for i, text in enumerate(["My name is Ada.", "I work as a pilot.", "We talked about engines.",
                                  "Jets are loud machines.", "Propellers spin fast here."]):
            await s.absorb_turn("t", "u", "old", i, turn(text), wait=True)
        recall = await s.recall("t", "u", "new", "What is my name?")
        assert recall.turns == [] and recall.session_summary == []
        assert recall.user_summary  # summaries of the other session
        assert any("Ada" in f.text for f in recall.facts)
        out = await s.assemble("t", "u", "new", [{"role": "user", "content": "What is my name?"}],
                               context_length=2_000, max_tokens=100)
        assert "Ada" in out.messages[0]["content"] and out.prompt_tokens <= 1_900
        with_history = await s.recall("t", "u", "unknown", None, history=[
            {"role": "system", "content": "x"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
        assert with_history.turns == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                      [{"role": "user", "content": "c"}]]

    run(go())


def test_absorbing_runs_in_the_background_and_never_delays_assembly():
    async def go():
        s = shard(SlowEmbedder(0.6))
        started = time.perf_counter()
        queued = await s.absorb_turn("t", "u", "s1", 0, turn("My name is Bo. I live in Oslo."))
        assert queued["queued"] and time.perf_counter() - started < 0.2
        started = time.perf_counter()
        out = await s.assemble("t", "u", "s1", [{"role": "user", "content": "Who am I?"}],
                               context_length=1_000, max_tokens=100)
        assert time.perf_counter() - started < 0.3  # while the facts are still being embedded
        assert out.turns == 1 and "I live in Oslo" in out.messages[0]["content"]  # the window is current
        await s.drain()
        assert (await s.list_memories("t", "u"))["total"] == 2

    run(go())


def test_full_queue_drops_the_oldest_analysis_but_keeps_the_turn():
    async def go():
        s = shard(SlowEmbedder(0.3), absorb_queue=1, **SMALL)
        for i in range(4):
            await s.absorb_turn("t", "u", "s1", i, turn(f"I love hobby number {i}."))
        await s.drain()
        session = s.loaded_users()[0].episodes.sessions["s1"]
        turns = [*session.pending, *session.window]
        assert all(t.analysed for t in turns)
        assert (await s.list_memories("t", "u"))["total"] < 4  # a dropped turn gave no fact

    run(go())


def test_capacity_evicts_the_lowest_priority_and_ttl_expires_unused():
    async def go():
        clock = Clock()
        s = shard(clock=clock, capacity={"max_memories_per_user": 3, "ttl_s": 100.0})
        ids = {}
        for text, importance in [("The user sails.", 0.9), ("The user hums.", 0.1),
                                 ("The user cooks.", 0.8), ("The user paints.", 0.7)]:
            ids[text] = (await s.add_memory("t", "u", text, importance=importance))["memory"]["id"]
        left = {m["text"] for m in (await s.list_memories("t", "u"))["data"]}
        assert left == {"The user sails.", "The user cooks.", "The user paints."}
        clock.now += 60
        await s.search_memories("t", "u", "sails")  # a search is not a use
        await s.recall("t", "u", None, "Does the user sail?", top_k=1)  # a recall is
        clock.now += 60
        result = await s.cleanup()
        left = {m["text"] for m in (await s.list_memories("t", "u"))["data"]}
        assert result["expired"] == 2 and left == {"The user sails."}  # the one used stays
        assert (await s.report())["tenants"][0]["users_detail"][0]["evicted"] == 1

    run(go())


def test_a_recall_for_a_preview_of_the_prompt_is_not_a_use():
    async def go():
        clock = Clock()
        s = shard(clock=clock, capacity={"ttl_s": 100.0})
        await s.add_memory("t", "u", "The user sails.")
        await s.add_memory("t", "u", "The user cooks.")
        clock.now += 60
        previewed = await s.recall("t", "u", None, "Does the user sail?", top_k=1, touch=False)
        used = await s.recall("t", "u", None, "Does the user cook?", top_k=1)
        assert [f.text for f in previewed.facts] == ["The user sails."]
        assert [f.text for f in used.facts] == ["The user cooks."]
        clock.now += 60
        assert (await s.cleanup())["expired"] == 1
        assert {m["text"] for m in (await s.list_memories("t", "u"))["data"]} == {"The user cooks."}

    run(go())


def test_idle_sessions_fold_into_the_user_summary():
    async def go():
        clock = Clock()
        s = shard(clock=clock, capacity={"session_ttl_s": 100.0}, **SMALL)
        for i in range(3):
            await s.absorb_turn("t", "u", "s1", i, turn(f"We planned the canoe trip part {i}."), wait=True)
        clock.now += 500
        result = await s.cleanup()
        memory = s.loaded_users()[0]
        assert result["sessions_expired"] == 1 and memory.episodes.sessions == {}
        assert any("canoe" in x.text for x in memory.episodes.user_summary)

    run(go())


def test_tenants_and_users_are_isolated():
    async def go():
        s = shard()
        mine = await s.add_memory("acme", "u", "The user likes cats.")
        await s.add_memory("acme", "v", "The user likes dogs.")
        assert (await s.list_memories("other", "u"))["total"] == 0
        assert (await s.search_memories("other", "u", "cats"))["data"] == []
        assert (await s.recall("other", "u", None, "cats?")).facts == []
        assert [m["text"] for m in (await s.list_memories("acme", "v"))["data"]] == ["The user likes dogs."]
        with pytest.raises(NotFoundError):
            await s.delete_memory("other", "u", mine["memory"]["id"])
        with pytest.raises(NotFoundError):
            await s.get_memory("acme", "v", mine["memory"]["id"])
        assert (await s.get_memory("acme", "u", mine["memory"]["id"]))["text"] == "The user likes cats."
        assert set(await s.usage()) == {"acme"}
        assert shard_for("acme", "u", 8) == shard_for("acme", "u", 8)

    run(go())


def test_memory_api_validates_and_decides():
    async def go():
        s = shard()
        first = await s.add_memory("t", "u", "The user lives in Rome.", kind="identity", slot="location", value="Rome")
        same = await s.add_memory("t", "u", "The user lives in Rome.", kind="identity")
        moved = await s.add_memory("t", "u", "The user lives in Milan.", kind="identity", slot="location",
                                   value="Milan")
        assert [r["decision"]["action"] for r in (first, same, moved)] == ["add", "none", "supersede"]
        assert moved["memory"]["origin"] == "api" and moved["memory"]["supersedes"] == [first["memory"]["id"]]
        page = await s.list_memories("t", "u", include_history=True, limit=1)
        assert page["total"] == 2 and page["has_more"] and len(page["data"]) == 1
        for bad in (dict(text=""), dict(text="x", kind="mood"), dict(text="x", importance=2.0)):
            with pytest.raises(InvalidRequestError):
                await s.add_memory("t", "u", **bad)
        with pytest.raises(InvalidRequestError):
            await s.list_memories("t", "u", limit=0)
        with pytest.raises(InvalidRequestError):
            await s.search_memories("t", "u", " ")
        found = await s.search_memories("t", "u", "Milan")
        assert found["data"][0]["text"] == "The user lives in Milan." and "similarity" in found["data"][0]
        deleted = await s.delete_memory("t", "u", moved["memory"]["id"])
        assert deleted == {"id": moved["memory"]["id"], "object": "memory", "deleted": True}
        assert (await s.delete_user_memories("t", "u"))["deleted"] == 1  # the history record
        assert (await s.list_memories("t", "u", include_history=True))["total"] == 0

    run(go())


def test_tenant_limit_warns_then_refuses():
    async def go():
        s = shard(capacity={"tenant_max_bytes": 3_000, "warn_fraction": 0.5})
        await s.add_memory("t", "u", "The user has a very long and detailed fact number one.")
        usage = (await s.usage("t"))["t"]
        assert usage["bytes"] > 0 and usage["limit_bytes"] == 3_000
        while (await s.usage("t"))["t"]["bytes"] < 3_000:
            await s.add_memory("t", "u", f"The user owns item {usage['bytes']} {time.perf_counter()}.")
        usage = (await s.usage("t"))["t"]
        assert usage["warning"] and "tenant_max_bytes=3000" in usage["warning"]
        with pytest.raises(CapacityError):
            await s.add_memory("t", "u", "One more.")
        result = await s.absorb_turn("t", "u", "s", 0, turn("My name is Zed."), wait=True)
        assert result["decisions"] == []  # facts are not stored over the limit

    run(go())


def test_report_counts_bytes_oldest_most_used_and_dedup_rate():
    async def go():
        clock = Clock()
        s = shard(clock=clock)
        for i, text in enumerate(["I live in Oslo.", "I live in Oslo.", "My name is Kai."]):
            clock.now += 1
            await s.absorb_turn("t", "u", "s1", i, turn(text), wait=True)
        await s.recall("t", "u", "s1", "What is my name?", top_k=1)
        report = await s.report()
        row = report["tenants"][0]
        detail = row["users_detail"][0]
        assert (row["tenant"], row["users"], row["memories"]) == ("t", 1, 2)
        assert detail["oldest"]["text"] == "The user lives in Oslo."
        assert detail["most_used"][0]["access_count"] == 1
        assert detail["decisions"] == {"candidates": 3, "add": 2, "update": 1, "supersede": 0, "none": 0}
        assert detail["dedup_rate"] == pytest.approx(1 / 3, abs=1e-3)
        assert row["bytes"] == detail["bytes"] > 0
        assert (await s.report(tenant="nobody"))["tenants"] == []

    run(go())


def test_model_backed_extractor_and_summarizer_go_through_generate():
    prompts = []

    async def generate(prompt: str) -> str:
        prompts.append(prompt)
        if "extract durable facts" in prompt:
            return '[{"fact": "The user sings.", "kind": "preference", "slot": null, "value": "", "importance": 0.5}]'
        return "They sang a lot. It was fun."

    async def go():
        s = MemoryShard(MemoryConfig(embedder="hashing", extractor="model", summarizer="model", **SMALL),
                        tokenizer=ByteTokenizer(), embedder=HashingEmbedder(), generate=generate)
        for i in range(4):
            result = await s.absorb_turn("t", "u", "s1", i, turn(f"La la la song {i}."), wait=True)
            assert result["decisions"][0]["text"] == "The user sings."
        session = s.loaded_users()[0].episodes.sessions["s1"]
        assert any(x.text == "They sang a lot." for node in session.summaries for x in node.sentences)

    run(go())
    with pytest.raises(ConfigError, match="memory.summarizer"):
        MemoryShard(MemoryConfig(embedder="hashing", summarizer="model"), embedder=HashingEmbedder())


def test_import_fills_an_empty_user_only():
    async def go():
        s = shard(index={"brute_force_below": 10})
        result = await s.import_memories("t", "u", [{"text": f"The user noted fact {i}."} for i in range(30)])
        assert result == {"object": "memory.import", "imported": 30, "graph": True}
        found = await s.search_memories("t", "u", "The user noted fact 7.")
        assert found["data"][0]["text"] == "The user noted fact 7."
        with pytest.raises(InvalidRequestError):
            await s.import_memories("t", "u", [{"text": "more"}])
        small = shard(capacity={"max_memories_per_user": 5})
        with pytest.raises(InvalidRequestError, match="max_memories_per_user=5"):
            await small.import_memories("t", "u", [{"text": f"fact {i}"} for i in range(6)])

    run(go())
