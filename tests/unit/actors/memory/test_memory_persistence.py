"""Memory survives a restart: Parquet files through pyarrow.fs, the HNSW graph reused or rebuilt."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import EntryPoint
from pathlib import Path

from actors.memory.persistence import MemoryStorage, UserFiles, to_parquet_bytes
from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from cluster.plugins import PluginRegistry
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer
from tests.support.memory_fixtures import SMALL, SlowEmbedder, turn


def run(coro):
    return asyncio.run(coro)


def config(root: Path, **extra) -> MemoryConfig:
    fields = {"embedder": "hashing", "storage_uri": str(root), "persist_interval_s": 0.0, **SMALL, **extra}
    return MemoryConfig(**fields)


def new_shard(root: Path, embedder=None, **extra) -> MemoryShard:
    return MemoryShard(config(root, **extra), tokenizer=ByteTokenizer(), embedder=embedder or HashingEmbedder())


def test_a_restarted_shard_keeps_facts_history_sessions_and_counters(tmp_path):
    async def write():
        s = new_shard(tmp_path)
        for i, text in enumerate(["I live in Paris.", "My name is Eve.", "I moved to Rome.", "Tides?", "Waves?"]):
            await s.absorb_turn("acme", "eve/1", "s1", i, turn(text), wait=True)
        await s.add_memory("acme", "eve/1", "The user collects stamps.")
        await s.recall("acme", "eve/1", "s1", "What is my name?")
        await s.close()
        return (await s.list_memories("acme", "eve/1", include_history=True)), s.loaded_users()[0]

    before, old = run(write())
    assert MemoryStorage(str(tmp_path)).users() == [("acme", "eve/1")]  # names survive encoding

    async def read():
        s = new_shard(tmp_path)
        after = await s.list_memories("acme", "eve/1", include_history=True)
        memory = s.loaded_users()[0]
        recall = await s.recall("acme", "eve/1", "s1", "Where do I live?")
        return after, memory, recall, await s.report()

    after, memory, recall, report = run(read())
    strip = lambda page: [{k: v for k, v in m.items() if k != "last_accessed_at"} for m in page["data"]]  # noqa: E731
    assert strip(after) == strip(before)
    assert {m["status"] for m in after["data"]} == {"active", "superseded"}
    session, old_session = memory.episodes.sessions["s1"], old.episodes.sessions["s1"]
    assert session.to_json() == old_session.to_json()
    assert recall.turns == old_session.recent_turns()
    assert "The user lives in Rome." in [f.text for f in recall.facts]
    assert report["tenants"][0]["users_detail"][0]["decisions"]["supersede"] == 1
    assert memory.longterm.next_key == old.longterm.next_key


def test_the_saved_graph_is_restored_or_rebuilt(tmp_path):
    texts = [{"text": f"The user noted fact number {i}."} for i in range(40)]

    async def write():
        s = new_shard(tmp_path, index={"brute_force_below": 16})
        await s.import_memories("t", "u", texts)
        await s.flush()

    run(write())
    folder = tmp_path / "tenants" / "t" / "u"
    assert (folder / "index.usearch").exists() and (folder / "facts.parquet").exists()

    async def read() -> bool:
        s = new_shard(tmp_path, index={"brute_force_below": 16})
        found = await s.search_memories("t", "u", "The user noted fact number 33.")
        assert found["data"][0]["text"] == "The user noted fact number 33."
        return s.loaded_users()[0].longterm.index.uses_graph

    assert run(read())
    (folder / "index.usearch").write_bytes(b"garbage")  # a damaged graph is rebuilt
    assert run(read())
    (folder / "index.usearch").unlink()
    assert run(read())


def test_the_graph_is_written_again_only_when_its_keys_change(tmp_path):
    texts = [{"text": f"The user noted fact number {i}."} for i in range(40)]
    graph = tmp_path / "tenants" / "t" / "u" / "index.usearch"

    async def go() -> None:
        s = new_shard(tmp_path, index={"brute_force_below": 16})
        await s.import_memories("t", "u", texts)
        await s.flush()
        first = graph.stat().st_mtime_ns
        await s.recall("t", "u", "s1", "The user noted fact number 3?")  # access counts only
        await asyncio.sleep(0.01)
        assert (await s.flush())["users"] == 1
        assert graph.stat().st_mtime_ns == first  # same keys: the stored graph is kept
        await s.add_memory("t", "u", "The user keeps bees on the roof.")  # a new key
        await s.flush()
        assert graph.stat().st_mtime_ns != first
        await s.close()

        again = new_shard(tmp_path, index={"brute_force_below": 16})  # the kept graph still loads
        found = await again.search_memories("t", "u", "The user keeps bees on the roof.")
        assert found["data"][0]["text"] == "The user keeps bees on the roof."
        memory = again.loaded_users()[0]
        assert memory.longterm.index.uses_graph and memory.graph_digest_written is not None
        await again.close()

    run(go())


def test_another_embedder_re_embeds_on_load(tmp_path):
    async def write():
        s = new_shard(tmp_path)
        await s.add_memory("t", "u", "The user plays chess.")
        await s.flush()

    run(write())

    async def read():
        s = MemoryShard(config(tmp_path, embedder={"name": "hashing", "options": {"dimension": 64}}),
                        embedder=HashingEmbedder(64))
        found = await s.search_memories("t", "u", "chess")
        return found, s.loaded_users()[0]

    found, memory = run(read())
    assert found["data"][0]["text"] == "The user plays chess."
    assert memory.longterm.index.dimension == 64 and memory.dirty


def test_turns_queued_at_a_crash_are_absorbed_after_restart(tmp_path):
    async def crash():
        s = new_shard(tmp_path, SlowEmbedder(1.0))
        await s.absorb_turn("t", "u", "s1", 0, turn("My name is Lin."))
        await asyncio.sleep(0.05)  # the analysis is under way, not finished
        await s.flush()  # the window is written; the facts are not there yet
        return (await s.list_memories("t", "u"))["total"]

    assert run(crash()) == 0

    async def restart():
        s = new_shard(tmp_path)
        await s.list_memories("t", "u")  # loading queues the unanalysed turn again
        await s.drain()
        return await s.list_memories("t", "u")

    page = run(restart())
    assert [m["text"] for m in page["data"]] == ["The user's name is Lin."]


def test_changes_are_written_shortly_after_without_flush(tmp_path):
    async def go():
        s = new_shard(tmp_path)
        await s.add_memory("t", "u", "The user swims.")
        deadline = time.monotonic() + 5
        while not (tmp_path / "tenants" / "t" / "u" / "facts.parquet").exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    run(go())


STORE: dict = {}


class DictBackend:
    """A memory backend plugin keeping the files in a dict (group m_ai.memory_backends)."""

    def __init__(self, bucket: str) -> None:
        self.files = STORE.setdefault(bucket, {})

    def users(self):
        return sorted(self.files)

    def read(self, tenant, user):
        return self.files.get((tenant, user), UserFiles(None, None, None))

    def write(self, tenant, user, facts, episodes, graph):
        self.files[(tenant, user)] = UserFiles(to_parquet_bytes(facts), to_parquet_bytes(episodes), graph)
        return 1

    def delete(self, tenant, user):
        self.files.pop((tenant, user), None)


def test_a_backend_plugin_replaces_the_files():
    point = EntryPoint("dict", "tests.unit.actors.memory.test_memory_persistence:DictBackend", "m_ai.memory_backends")
    registry = PluginRegistry(entry_points=lambda group: [point] if group == "m_ai.memory_backends" else [])
    memory_config = MemoryConfig(embedder="hashing", backend={"name": "dict", "options": {"bucket": "b1"}})

    async def go(text: str | None):
        s = MemoryShard(memory_config, embedder=HashingEmbedder(), registry=registry)
        if text:
            await s.add_memory("t", "u", text)
            await s.close()
        return await s.list_memories("t", "u")

    run(go("The user knits."))
    import importlib

    plugin_module = importlib.import_module("tests.unit.actors.memory.test_memory_persistence")  # as the entry point loads it
    assert list(plugin_module.STORE["b1"]) == [("t", "u")]
    assert [m["text"] for m in run(go(None))["data"]] == ["The user knits."]
