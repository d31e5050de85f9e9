"""The ingress's memory client without Ray: a shard that is missing or failing never fails a
chat (recall answers None), absorbing runs in the background and a recall of the same session
waits for it, usage sums shards; where memory's files go by default; whose memory it is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.memory.shard import MemoryShard
from cluster.config import build_app_config
from cluster.errors import EngineDeadError
from deployments.app import memory_storage_uri
from deployments.ingress.stores.memory_client import MemoryClient, memory_user, sum_usage
from tests.support.fake_handles import PlainHandle


class _Broken:
    async def recall(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("index corrupted")

    async def absorb_turn(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")


TURN = [{"role": "user", "content": "I am allergic to peanuts."}, {"role": "assistant", "content": "Noted."}]


def test_recall_is_none_when_the_shard_is_missing_or_failing():
    def missing(name: str) -> Any:
        raise ValueError(f"actor {name} not found")

    async def run() -> None:
        assert await MemoryClient(1, missing).recall("t", "u", "sess-1", "hi", []) is None
        broken = MemoryClient(1, lambda name: PlainHandle(_Broken()))
        assert await broken.recall("t", "u", "sess-1", "hi", []) is None
        await broken.absorb("t", "u", "sess-1", 2, TURN)  # logged, not raised
        with pytest.raises(EngineDeadError, match="memory shard 0 is unavailable"):
            await MemoryClient(1, missing).list("t", "u", False, 10, 0)

    asyncio.run(run())


def test_absorb_in_background_then_recall_sees_the_turn_and_its_fact():
    async def run() -> None:
        shard = MemoryShard({"embedder": "hashing"})
        client = MemoryClient(1, lambda name: PlainHandle(shard))
        client.absorb("acme", "ada", "sess-a", 2, TURN)  # not awaited
        recall = await client.recall("acme", "ada", "sess-a", "What am I allergic to?", [])
        assert recall.turns == [TURN]  # the recall waited for the absorb of its session
        await shard.drain()
        recall = await client.recall("acme", "ada", "sess-b", "Am I allergic to anything?", [])
        assert [f.text for f in recall.facts] == ["The user is allergic to peanuts."]
        other = await client.recall("globex", "ada", "sess-b", "Am I allergic to anything?", [])
        assert other.facts == []

    asyncio.run(run())


def test_usage_sums_shards_and_keeps_the_worst_warning():
    rows = [
        {"tenant": "a", "users": 1, "memories": 3, "bytes": 100, "limit_bytes": 1000,
         "limit_fraction": 0.1, "warning": None},
        {"tenant": "a", "users": 2, "memories": 4, "bytes": 900, "limit_bytes": 1000,
         "limit_fraction": 0.9, "warning": "near"},
    ]
    total = sum_usage("a", rows)
    assert (total["users"], total["memories"], total["bytes"]) == (3, 7, 1000)
    assert total["limit_fraction"] == 0.9 and total["warning"] == "near"
    assert sum_usage("a", [])["memories"] == 0


def test_memory_files_default_beside_the_session_state():
    config = build_app_config(
        {"serving": {"session_state_uri": "s3://bucket/m-ai/sessions?endpoint_override=x"}}, "t"
    )
    assert memory_storage_uri(config.memory, config.serving) == "s3://bucket/m-ai/memory?endpoint_override=x"
    local = build_app_config({"serving": {"session_state_uri": "/data/m-ai/sessions/"}}, "t")
    assert memory_storage_uri(local.memory, local.serving) == "/data/m-ai/memory"
    chosen = build_app_config({"memory": {"storage_uri": "/mem"}}, "t")
    assert memory_storage_uri(chosen.memory, chosen.serving) == "/mem"


def test_whose_memory():
    assert memory_user("ada", "session-user", "sess-1") == "ada"
    assert memory_user(None, "session-user", "sess-1") == "session-user"
    assert memory_user(None, None, "sess-1") == "session:sess-1"
