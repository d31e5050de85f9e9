"""An acknowledged memory write is durable when the call returns: a shard that dies right
after (no flush, no close) and a new one on the same storage find it, with the same id.
Ids that would make over-long file names are stored under fixed-length names."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.memory.persistence import MAX_NAME_BYTES, MemoryStorage, folder_name
from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from cluster.errors import NotFoundError
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer


def shard(root: Path) -> MemoryShard:
    # A long write delay: without the journal nothing would be on disk when the shard dies.
    config = MemoryConfig(embedder="hashing", storage_uri=str(root), persist_interval_s=3600.0)
    return MemoryShard(config, tokenizer=ByteTokenizer(), embedder=HashingEmbedder())


def journal_files(root: Path) -> list[Path]:
    return sorted(root.glob("tenants/*/*/journal/*.json"))


def test_an_acknowledged_memory_survives_a_crash_right_after_the_answer(tmp_path):
    async def write():
        s = shard(tmp_path)
        a = await s.add_memory("acme", "ann", "The user rides a red bicycle.")
        b = await s.add_memory("acme", "ann", "The user lives in Oslo.", slot="location", value="Oslo")
        c = await s.add_memory("acme", "ann", "The user lives in Bergen.", slot="location", value="Bergen")
        gone = await s.add_memory("acme", "ann", "The user keeps bees.")
        await s.delete_memory("acme", "ann", gone["memory"]["id"])
        return a, b, c, gone  # no flush, no close: the process "dies" here

    a, b, c, gone = asyncio.run(write())
    assert not list(tmp_path.glob("tenants/*/*/facts.parquet"))  # only the journal holds them
    assert len(journal_files(tmp_path)) == 5

    async def read():
        s = shard(tmp_path)
        page = await s.list_memories("acme", "ann", include_history=True)
        with pytest.raises(NotFoundError):
            await s.get_memory("acme", "ann", gone["memory"]["id"])
        found = await s.search_memories("acme", "ann", "bicycle")
        await s.flush()
        return page, found

    page, found = asyncio.run(read())
    by_id = {m["id"]: m for m in page["data"]}
    assert by_id[a["memory"]["id"]]["text"] == "The user rides a red bicycle."
    assert by_id[b["memory"]["id"]]["status"] == "superseded"
    assert by_id[c["memory"]["id"]]["status"] == "active"
    assert by_id[b["memory"]["id"]]["superseded_by"] == c["memory"]["id"]
    assert len(by_id) == 3
    assert found["data"][0]["id"] == a["memory"]["id"]  # its vector came back too
    # Written whole now: the journal entries it holds are gone, the state stays.
    assert journal_files(tmp_path) == []
    again = asyncio.run(shard(tmp_path).list_memories("acme", "ann", include_history=True))
    assert {m["id"] for m in again["data"]} == set(by_id)


def test_forgetting_a_user_is_durable_at_once(tmp_path):
    async def write():
        s = shard(tmp_path)
        await s.add_memory("acme", "bob", "The user keeps goats.")
        await s.flush()
        await s.delete_user_memories("acme", "bob")

    asyncio.run(write())
    page = asyncio.run(shard(tmp_path).list_memories("acme", "bob", include_history=True))
    assert page["data"] == []


def test_entries_already_in_the_files_are_not_replayed_twice(tmp_path):
    """A crash between writing the files and removing the journal: replay skips what the
    files hold (a delete_all replayed over later facts would lose them)."""

    async def write():
        s = shard(tmp_path)
        await s.add_memory("acme", "cy", "The user sails.")
        await s.delete_user_memories("acme", "cy")
        kept = await s.add_memory("acme", "cy", "The user paints.")
        entries = {p: p.read_bytes() for p in journal_files(tmp_path)}
        await s.flush()
        for path, data in entries.items():  # as if the removal never happened
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return kept

    kept = asyncio.run(write())
    page = asyncio.run(shard(tmp_path).list_memories("acme", "cy"))
    assert [m["id"] for m in page["data"]] == [kept["memory"]["id"]]


@pytest.mark.parametrize("user", ["u" * 256, "ü" * 256, "🦙" * 256])
def test_a_long_user_id_is_stored_under_a_fixed_length_name(tmp_path, user):
    async def write():
        s = shard(tmp_path)
        added = await s.add_memory("acme", user, "The user likes long names.")
        await s.flush()
        return added

    added = asyncio.run(write())
    name = folder_name(user)
    assert name.startswith("=") and len(name) == 65
    assert MemoryStorage(str(tmp_path)).users() == [("acme", user)]
    got = asyncio.run(shard(tmp_path).get_memory("acme", user, added["memory"]["id"]))
    assert got["text"] == "The user likes long names."


def test_short_ids_keep_their_readable_names():
    assert folder_name("eve/1") == "eve%2F1"
    assert folder_name("x" * MAX_NAME_BYTES) == "x" * MAX_NAME_BYTES
    assert folder_name("x" * (MAX_NAME_BYTES + 1)).startswith("=")


def test_turns_missed_while_memory_was_down_are_absorbed_once_from_the_session_log(tmp_path):
    """Memory knew turn 2 of a session; turns 4 and 6 never reached it (its shard was down).
    The next request hands it the session's messages: it absorbs 4 and 6, once each, and a
    late delivery of turn 4 is refused."""
    from actors.memory.catchup import missed_turns

    def exchange(i):
        return [{"role": "user", "content": f"I have {i} cats."}, {"role": "assistant", "content": "Noted."}]

    history = exchange(1) + exchange(2) + exchange(3)

    async def go():
        s = shard(tmp_path)
        await s.absorb_turn("acme", "eli", "s1", 2, exchange(1), wait=True)
        session = s.loaded_users()[0].episodes.sessions["s1"]
        assert [t for t, _ in missed_turns(session, history)] == [4, 6]
        recall = await s.recall("acme", "eli", "s1", "How many cats?", history=history)
        await s.drain()
        again = missed_turns(session, history)
        late = await s.absorb_turn("acme", "eli", "s1", 4, exchange(2))
        return recall, again, late, [t.turn_id for t in (*session.pending, *session.window)]

    recall, again, late, known = asyncio.run(go())
    assert again == [] and late["queued"] is False
    assert known == [2, 4, 6]
    assert [turn[0]["content"] for turn in recall.turns] == ["I have 1 cats.", "I have 2 cats.", "I have 3 cats."]


def test_a_session_memory_knows_nothing_of_is_not_replayed():
    from actors.memory.catchup import missed_turns
    from actors.memory.episodic import SessionEpisodes

    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert missed_turns(None, history) == []
    assert missed_turns(SessionEpisodes("s1"), history) == []  # e.g. the user's memory was deleted
