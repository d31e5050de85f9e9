"""Memory units: dates resolved at absorb time, BM25, fusion, speakers, packing, persistence."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from actors.memory.recall.dates import annotate, parse_date_time, question_time, resolve_mentions
from actors.memory.recall.lexical import LexicalIndex, terms
from actors.memory.recall.retrieval import RecalledUnit, _rrf, pack_units, rank_units
from actors.memory.shard import MemoryShard
from actors.memory.units import MemoryUnit, UserUnits
from cluster.config import AppConfig, config_error
from cluster.config.memory import MemoryConfig, UnitRetrievalConfig
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer

MAY_8 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC).timestamp()  # a Monday


def run(coro):
    return asyncio.run(coro)


def labels(text: str, at: float = MAY_8) -> list[str]:
    return [m.label for m in resolve_mentions(text, at)]


# -- time ----------------------------------------------------------------------------------------


def test_relative_expressions_resolve_against_the_turns_date():
    assert labels("I went to a support group yesterday.") == ["7 May 2023"]
    assert labels("We are going camping next month") == ["June 2023"]
    assert labels("I gave a talk at a school last week") == ["the week before 8 May 2023"]
    assert labels("I ran a charity race last Sunday") == ["the Sunday before 8 May 2023"]
    assert labels("Two weekends ago we camped, and 3 days ago I painted") == [
        "two weekends before 8 May 2023", "5 May 2023"]
    assert labels("I painted that last year; next Friday we fly") == ["2022", "the Friday after 8 May 2023"]
    assert labels("Nothing about time here.") == []
    mention = resolve_mentions("yesterday", MAY_8)[0]
    assert mention.end - mention.start == 86_400
    assert datetime.fromtimestamp(mention.start, tz=UTC).date().isoformat() == "2023-05-07"
    text = "I went there yesterday and loved it"
    assert annotate(text, resolve_mentions(text, MAY_8)) == "I went there yesterday [7 May 2023] and loved it"


def test_session_dates_and_questions_about_time():
    assert parse_date_time("1:56 pm on 8 May, 2023") == MAY_8
    assert parse_date_time("8 May 2023") == datetime(2023, 5, 8, tzinfo=UTC).timestamp()
    assert parse_date_time("whenever") is None
    asked = question_time("What did Caroline do in May 2023?")
    assert not asked.asks_when and asked.matches(MAY_8, MAY_8 + 1)
    assert not asked.matches(MAY_8 + 40 * 86_400, MAY_8 + 41 * 86_400)
    assert question_time("When did Melanie paint a sunrise?").asks_when
    before = question_time("What did she paint before 2023?")
    assert before.direction == "before" and before.matches(MAY_8 - 400 * 86_400, MAY_8 - 399 * 86_400)
    assert not before.matches(MAY_8, MAY_8 + 1)


# -- lexical index and fusion ----------------------------------------------------------------------


def test_bm25_prefers_rare_words_and_forgets_removed_documents():
    index = LexicalIndex()
    docs = ["I love painting sunsets", "I love my kids", "We read Charlotte's Web together", "I love running"]
    for key, text in enumerate(docs, start=1):
        index.add(key, text)
    assert index.search("Which book about Charlotte did they read?", 2)[0][0] == 3
    assert index.search("paints", 1)[0][0] == 1  # inflections fold together
    assert terms("The kids are running!") == ["kid", "run"]
    index.remove(3)
    assert all(key != 3 for key, _ in index.search("Charlotte", 5))
    rebuilt = LexicalIndex()
    rebuilt.rebuild((k, t) for k, t in enumerate(docs, start=1) if k != 3)
    assert rebuilt.search("love", 3) == index.search("love", 3)


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = _rrf([[1, 2, 3], [3, 1, 4]], 60.0)
    assert max(fused, key=fused.get) == 1  # 1st and 2nd beats 3rd and 1st
    assert fused[3] > fused[2] and fused[4] == pytest.approx(1 / 63)


def units_of(lines: list[tuple[str, str]], at: float = MAY_8, session: str = "s1") -> UserUnits:
    embedder = HashingEmbedder()
    units = UserUnits(embedder.dimension)
    for turn_id, (speaker, text) in enumerate(lines):
        unit = units.add(MemoryUnit(0, session, turn_id, 0, "user", speaker, text, at, resolve_mentions(text, at)))
        unit.tokens = len(unit.line) + 1
    batch = units.take_unembedded(100)
    units.set_vectors(batch, embedder.embed([u.line for u in batch]))
    return units


def test_each_retriever_alone_and_fused_and_the_speaker_signal():
    units = units_of([
        ("Caroline", "I researched adoption agencies this week."),
        ("Melanie", "I researched adoption agencies too, for a friend."),
        ("Melanie", "My kids love dinosaurs."),
        ("Caroline", "The weather was nice."),
    ])
    config = UnitRetrievalConfig(neighbours=0)
    query = "What did Caroline research?"
    vector = HashingEmbedder().embed([query])[0]
    for mode in ("dense", "lexical", "fused", "hybrid"):
        assert rank_units(units, query, vector, config, mode=mode), mode
    top = rank_units(units, query, vector, config, mode="hybrid")[0]
    assert top.line.startswith("Caroline: I researched")  # the person the question names
    assert rank_units(units, "dinosaurs", None, config, mode="lexical")[0].line == "Melanie: My kids love dinosaurs."


def test_hybrid_finds_a_reply_by_the_words_of_the_message_it_answers():
    lines = [
        ("Caroline", "What did you paint last weekend?"),
        ("Melanie", "Here it is, I finished it on Sunday!"),
        ("Caroline", "The weather was nice at the lake."),
        ("Melanie", "My kids love the lake and dinosaurs."),
    ]
    units = units_of(lines)
    config = UnitRetrievalConfig(neighbours=0)
    # the reply has none of the question's words: only its context finds it
    assert 2 not in {u.turn_id for u in rank_units(units, "paint", None, config, mode="lexical")}
    hybrid = rank_units(units, "paint", None, config, mode="hybrid")
    assert hybrid[0].turn_id == 0 and 1 in {u.turn_id for u in hybrid}  # its own words first
    # a unit ranks above its neighbours for its own words
    assert rank_units(units, "dinosaurs", None, config, mode="hybrid")[0].turn_id == 3
    # a unit added later joins its neighbour's context; a bulk load indexes the same
    units.add(MemoryUnit(0, "s1", 4, 0, "user", "Caroline", "Dinosaurs? Which ones?", MAY_8, []))
    assert 3 in {u.turn_id for u in rank_units(units, "ones", None, config, mode="hybrid")}
    loaded = UserUnits(units.dense.dimension)
    loaded.load_rows([{"data": json.dumps(u.to_json()), "vector": None} for u in units.units.values()], False)
    for query in ("paint", "dinosaurs", "ones", "lake weather"):
        assert loaded.contextual.search(query, 10) == units.contextual.search(query, 10)


def test_hybrid_dense_keys_carry_the_meaning_of_the_neighbouring_messages():
    lines = [
        ("Jon", "Why did you open a shop of your own?"),
        ("Gina", "Thanks! I'm passionate about it."),
        ("Jon", "The weather was nice at the lake."),
        ("Gina", "Loved the lake."),
        ("Jon", "My kids love dinosaurs."),
        ("Gina", "Dinosaurs rock."),
        ("Jon", "Chess tonight?"),
        ("Gina", "Sure, at eight."),
    ]
    embedder = HashingEmbedder()
    units = units_of(lines)
    plain = {k: units.dense.vector(k) for k in units.units}
    order = [key for _, _, key in units.sessions["s1"]]
    # a unit's contextual vector: its own plus a fifth of each neighbour's within three, unit length
    for at, key in enumerate(order):
        expected = plain[key] + 0.2 * sum(plain[order[j]] for j in range(max(0, at - 3), min(len(order), at + 4)) if j != at)
        expected /= np.linalg.norm(expected)
        assert np.allclose(units.contextual_dense.vector(key), expected, atol=0.02)
    # the reply shares no word with the question about the shop: its own vector barely matches,
    # its contextual one carries the question it answers
    query = embedder.embed(["open a shop of your own"])[0]
    reply = order[1]
    assert float(units.contextual_dense.vector(reply) @ query) > float(plain[reply] @ query) + 0.05
    config = UnitRetrievalConfig(neighbours=0)
    hybrid = [u.turn_id for u in rank_units(units, "open a shop of your own", query, config, mode="hybrid")]
    dense = [u.turn_id for u in rank_units(units, "open a shop of your own", query, config, mode="dense")]
    assert hybrid.index(1) < dense.index(1)
    # vectors that arrive one by one give what a bulk load (a restart) computes at once
    loaded = UserUnits(units.dense.dimension)
    rows = [{"data": json.dumps(u.to_json()), "vector": units.dense.stored(u.key).tobytes()}
            for u in units.units.values()]
    loaded.load_rows(rows, True)
    for key in order:
        assert np.allclose(loaded.contextual_dense.vector(key), units.contextual_dense.vector(key), atol=1e-6)
    units.remove_session("s1")
    assert len(units.contextual_dense) == 0


def test_neighbours_of_a_hit_are_offered_and_time_questions_prefer_dated_units():
    units = units_of([
        ("Ann", "Guess what happened at the lake."),
        ("Bob", "Tell me!"),
        ("Ann", "We saw an otter yesterday."),
        ("Bob", "Otters are cute animals."),
    ])
    config = UnitRetrievalConfig(neighbours=1)
    found = rank_units(units, "When did Ann see an otter?", None, config, mode="hybrid")
    assert found[0].line == "Ann: We saw an otter yesterday [7 May 2023]."
    assert {u.turn_id for u in found} >= {1, 2, 3}  # the turn before came along as a neighbour


def test_packing_fills_the_budget_grouped_by_session_without_duplicates():
    def unit(key, session, turn_id, at, text):
        return RecalledUnit(key, session, turn_id, 0, at, f"A: {text}", len(f"A: {text}"), 1.0 / key)

    later = MAY_8 + 30 * 86_400
    recalled = [unit(1, "s2", 5, later, "newer hit"), unit(2, "s1", 3, MAY_8, "older hit"),
                unit(1, "s2", 5, later, "newer hit"), unit(3, "s1", 1, MAY_8, "earlier in s1"),
                unit(4, "s3", 0, later + 86_400, "x" * 500)]
    packed = pack_units(recalled, 120, len, "Earlier:")
    assert packed.text.splitlines() == ["Earlier:", "[8 May 2023]", "A: earlier in s1", "A: older hit",
                                        "[7 June 2023]", "A: newer hit"]
    assert packed.cost == len(packed.text) + 1 <= 120  # each line and its line break
    assert sorted(packed.keys) == [1, 2, 3]
    assert pack_units(recalled, 5, len, "Earlier:").keys == []


# -- the shard -----------------------------------------------------------------------------------


def new_shard(root: Path | None = None, **extra) -> MemoryShard:
    fields = {"embedder": "hashing", "persist_interval_s": 0.0, **extra}
    if root is not None:
        fields["storage_uri"] = str(root)
    return MemoryShard(MemoryConfig(**fields), tokenizer=ByteTokenizer(), embedder=HashingEmbedder())


async def absorb_conversation(s: MemoryShard, tenant: str = "t", user: str = "pair") -> None:
    sessions = [
        ("s1", MAY_8, [("Caroline", "I went to a LGBTQ support group yesterday."),
                       ("Melanie", "That sounds powerful! I painted a sunrise last year.")]),
        ("s2", MAY_8 + 20 * 86_400, [("Melanie", "We are going camping next month."),
                                     ("Caroline", "Have fun with the kids!")]),
    ]
    for session_id, at, turns in sessions:
        for turn_id, (speaker, text) in enumerate(turns):
            role = "user" if speaker == "Caroline" else "assistant"
            await s.absorb_turn(tenant, user, session_id, turn_id,
                                [{"role": role, "content": text, "name": speaker}], at=at)
    await s.drain()


def test_a_new_session_finds_dated_turns_of_earlier_sessions():
    async def go():
        s = new_shard(context={"units_share": 1.0})
        await absorb_conversation(s)
        assembled = await s.assemble("t", "pair", "new", [{"role": "user", "content":
                                     "When did Caroline go to the support group?"}],
                                     context_length=600, max_tokens=50)
        assert assembled.prompt_tokens <= 550 and assembled.units
        system = assembled.messages[0]["content"]
        assert "[8 May 2023]\nCaroline: I went to a LGBTQ support group yesterday [7 May 2023]." in system
        assert "When did" not in system  # the question is the request, not memory
        found = await s.search_units("t", "pair", "camping", mode="lexical")
        assert found[0].line == "Melanie: We are going camping next month [June 2023]."
        assert await s.search_units("other-tenant", "pair", "camping", mode="lexical") == []

    run(go())


def test_units_survive_a_restart_and_go_with_a_forgotten_session(tmp_path):
    async def go():
        s = new_shard(tmp_path)
        await absorb_conversation(s)
        before = await s.search_units("t", "pair", "Which sunrise did Melanie paint?")
        await s.close()
        again = new_shard(tmp_path)
        memory = await again.users.get("t", "pair")
        assert len(memory.units) == 4 and not memory.units.unembedded  # vectors came back stored
        after = await again.search_units("t", "pair", "Which sunrise did Melanie paint?")
        assert [u.line for u in after] == [u.line for u in before]
        assert memory.units.units[after[0].key].times[0].label == "2022"
        result = await again.forget_session("t", "s1")
        assert result["units_removed"] == 2
        assert all(u.session_id == "s2" for u in await again.search_units("t", "pair", "support group sunrise"))
        await again.delete_user_memories("t", "pair")
        assert await again.search_units("t", "pair", "camping") == []
        await again.close()

    run(go())


def test_an_app_config_refuses_model_extraction_with_the_fix():
    with pytest.raises(Exception) as raised:
        AppConfig.model_validate({"models": [{"name": "m"}], "memory": {"extractor": "model"}})
    message = str(config_error(raised.value))
    assert "memory.extractor" in message and "use memory.extractor: rules" in message
    with pytest.raises(Exception, match="summarizer: extractive"):
        AppConfig.model_validate({"models": [{"name": "m"}], "memory": {"summarizer": "model"}})
    assert MemoryConfig(extractor="model").extractor == "model"  # library use with generate= stays possible
    assert AppConfig.model_validate({"models": [{"name": "m"}]}).memory.extractor == "rules"


def test_the_turn_import_api_keeps_speaker_names_and_dates():
    from deployments.ingress.stores.memory import IngressMemory
    from deployments.ingress.stores.memory_client import MemoryClient
    from tests.support.fake_handles import PlainHandle

    async def go():
        s = new_shard()
        ingress = IngressMemory(None, None, MemoryClient(1, lambda name: PlainHandle(s)))
        body = {"user": "pair", "session_id": "s1", "turn_id": 0, "at": MAY_8,
                "messages": [{"role": "user", "content": "I adopted a puppy yesterday.", "name": "Jon"}]}
        result = await ingress.add_turn("t", body)
        assert result["object"] == "memory.turn" and result["queued"] is True
        found = await s.search_units("t", "pair", "When did Jon adopt a puppy?")
        assert found[0].line == "Jon: I adopted a puppy yesterday [7 May 2023]."
        with pytest.raises(Exception, match="turn_id"):
            await ingress.add_turn("t", {**body, "turn_id": -1})

    run(go())
