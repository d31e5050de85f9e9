"""A deleted session takes what memory absorbed from it: the session-scoped user goes whole
(memory and storage), named users lose the session's window but keep their facts, queued and
late turns of the session never come back; the client asks every shard and refuses (503) when
one cannot answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from actors.memory.forget import session_user
from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from cluster.errors import EngineDeadError
from deployments.ingress.stores.memory_client import MemoryClient, memory_user
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer
from tests.support.fake_handles import PlainHandle


def shard(storage: str | None = None) -> MemoryShard:
    config: dict[str, Any] = {"embedder": "hashing", "persist_interval_s": 0.01}
    if storage:
        config["storage_uri"] = storage
    return MemoryShard(MemoryConfig(**config), tokenizer=ByteTokenizer(), embedder=HashingEmbedder(),
                       clock=time.time)


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]


def test_the_session_scoped_user_goes_whole_from_memory_and_storage(tmp_path):
    user = memory_user(None, None, "s1")
    assert user == session_user("s1")

    async def run() -> None:
        s = shard(str(tmp_path))
        await s.absorb_turn("acme", user, "s1", 0, turn("I live in Paris."), wait=True)
        await s.absorb_turn("acme", "bob", "s2", 0, turn("I live in Rome."), wait=True)
        await s.flush()
        assert ("acme", user) in s.users.storage.users()
        assert (await s.usage("acme"))["acme"]["users"] == 2

        forgotten = await s.forget_session("acme", "s1")
        assert forgotten["session_user_removed"] is True
        assert (await s.usage("acme"))["acme"]["users"] == 1
        assert ("acme", user) not in s.users.storage.users()
        assert ("acme", "bob") in s.users.storage.users()
        assert (await s.list_memories("acme", user))["data"] == []
        await s.close()

        reopened = shard(str(tmp_path))  # nothing of s1 comes back from storage
        assert await reopened.load_all() == 1
        assert (await reopened.list_memories("acme", "bob"))["data"]
        await reopened.close()

    asyncio.run(run())


def test_a_named_user_loses_the_sessions_window_and_keeps_its_facts():
    async def run() -> None:
        s = shard()
        await s.absorb_turn("acme", "ada", "s1", 0, turn("I am allergic to peanuts."), wait=True)
        await s.absorb_turn("acme", "ada", "s2", 0, turn("We talked about the canoe trip."), wait=True)
        await s.absorb_turn("other", "ada", "s1", 0, turn("Same session id, other tenant."), wait=True)
        facts = (await s.list_memories("acme", "ada"))["data"]
        assert facts

        forgotten = await s.forget_session("acme", "s1")
        assert forgotten["windows_removed"] == 1 and forgotten["session_user_removed"] is False
        ada = s.users.find(("acme", "ada"))
        assert set(ada.episodes.sessions) == {"s2"}
        assert all("peanuts" not in x.text for x in ada.episodes.user_summary)
        assert (await s.list_memories("acme", "ada"))["data"] == facts  # the user's facts stay
        assert set(s.users.find(("other", "ada")).episodes.sessions) == {"s1"}  # other tenant
        await s.close()

    asyncio.run(run())


def test_queued_and_late_turns_of_a_forgotten_session_never_come_back():
    user = session_user("s1")

    async def run() -> None:
        s = shard()
        for i in range(3):
            await s.absorb_turn("acme", user, "s1", i, turn(f"My cat number {i} is called Tom{i}."))
        forgotten = await s.forget_session("acme", "s1")
        late = await s.absorb_turn("acme", user, "s1", 3, turn("I live in Oslo."), wait=True)
        assert late["queued"] is False and "deleted" in late["reason"]
        await s.drain()
        assert forgotten["turns_dropped"] + 1 >= 3  # the first may already be running
        assert s.users.find(("acme", user)) is None
        assert "acme" not in await s.usage("acme")
        assert (await s.list_memories("acme", user))["data"] == []
        await s.close()

    asyncio.run(run())


def test_a_request_that_raced_the_delete_leaves_no_user_behind(tmp_path):
    """A chat request reads its session, the session is deleted, then the request recalls
    (with the history it read): the deleted session's user is not loaded again."""
    user = session_user("s1")
    history = [{"role": "user", "content": "I live in Oslo."}, {"role": "assistant", "content": "Noted."}]

    async def run() -> None:
        s = shard(str(tmp_path))
        await s.absorb_turn("acme", user, "s1", 0, turn("I live in Oslo."), wait=True)
        await s.forget_session("acme", "s1")
        for _ in range(3):
            recall = await s.recall("acme", user, "s1", "Where do I live?", history=history)
            assert recall.facts == [] and recall.session_summary == []
        await s.drain()
        assert s.loaded_users() == []
        assert "acme" not in await s.usage("acme")
        await s.close()
        assert s.users.storage.users() == []

    asyncio.run(run())


def test_the_client_asks_every_shard_and_refuses_when_one_is_down():
    async def run() -> None:
        shards = [shard(), shard()]
        for i, s in enumerate(shards):  # the session left a window on both shards
            await s.absorb_turn("acme", f"user{i}", "s1", 0, turn("We met at the station."), wait=True)
        client = MemoryClient(2, lambda name: PlainHandle(shards[int(name.rsplit("-", 1)[1])]))
        result = await client.forget_session("acme", "s1")
        assert result["windows_removed"] == 2
        assert all(not s.users.find(("acme", f"user{i}")).episodes.sessions for i, s in enumerate(shards))

        def second_is_down(name: str) -> Any:
            if name.endswith("-1"):
                raise ValueError(f"actor {name} not found")
            return PlainHandle(shards[0])

        with pytest.raises(EngineDeadError, match="memory shard 1 is unavailable"):
            await MemoryClient(2, second_is_down).forget_session("acme", "s1")
        for s in shards:
            await s.close()

    asyncio.run(run())
