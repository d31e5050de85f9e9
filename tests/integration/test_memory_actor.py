"""The memory as a Ray actor: background absorbing, a restart that keeps long-term memory,
tenant isolation. ``MemoryShard`` is wrapped with ``ray.remote(max_restarts=1)`` as the
application will do, under the shared local Ray of ``serve_harness``.
"""

from __future__ import annotations

import time
import uuid

import pytest

from cluster.config.memory import MemoryConfig
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer
from tests.support.serve_harness import wait_until


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted, thanks."}]


@pytest.fixture
def memory_actor(serve_cluster, tmp_path):
    import ray

    from actors.memory.shard import MemoryShard

    config = MemoryConfig(embedder="hashing", storage_uri=str(tmp_path / "memory"), persist_interval_s=0.2,
                          episodic={"window_tokens": 120, "episode_turns": 2, "fanout": 2})
    actor = ray.remote(MemoryShard).options(
        name=f"memory-test-{uuid.uuid4().hex[:8]}", max_restarts=1, num_cpus=0.1
    ).remote(config, shard=0, tokenizer=ByteTokenizer(), embedder=HashingEmbedder())
    yield actor
    ray.kill(actor, no_restart=True)


def test_long_term_memory_survives_an_actor_restart(memory_actor, tmp_path):
    import ray

    from actors.memory.persistence import MemoryStorage, parse_facts

    storage_root = tmp_path / "memory"  # the fixture's storage_uri

    started = time.perf_counter()
    queued = ray.get(memory_actor.absorb_turn.remote("acme", "ann", "s1", 0, turn("My name is Ann.")))
    assert queued["queued"] and time.perf_counter() - started < 5
    for i, text in enumerate(["I live in Oslo.", "Tell me about fjords.", "I moved to Bergen.",
                              "My favourite drink is cocoa."], start=1):
        ray.get(memory_actor.absorb_turn.remote("acme", "ann", "s1", i, turn(text)))
    added = ray.get(memory_actor.add_memory.remote("acme", "ann", "The user rides a red bicycle."))
    ray.get(memory_actor.drain.remote())
    before = ray.get(memory_actor.list_memories.remote("acme", "ann", include_history=True))
    assert {m["text"] for m in before["data"] if m["status"] == "active"} == {
        "The user's name is Ann.", "The user lives in Bergen.", "The user's favourite drink is cocoa.",
        "The user rides a red bicycle."}
    ray.get(memory_actor.flush.remote())
    stored = MemoryStorage(str(storage_root)).read("acme", "ann")  # on disk before the kill
    assert stored.facts is not None and stored.episodes is not None
    assert {r.text for r in parse_facts(stored.facts).records if r.active} == {
        m["text"] for m in before["data"] if m["status"] == "active"}

    pid = ray.get(memory_actor.stats.remote())["pid"]
    ray.kill(memory_actor, no_restart=False)  # Ray restarts it (max_restarts=1)
    wait_until(  # a new process, whose state can only come from storage
        lambda: ray.get(memory_actor.stats.remote(), timeout=10)["pid"] != pid,
        timeout_s=60, what="the memory actor back after its restart",
    )
    after = ray.get(memory_actor.list_memories.remote("acme", "ann", include_history=True))
    key = lambda page: sorted((m["id"], m["text"], m["status"]) for m in page["data"])  # noqa: E731
    assert key(after) == key(before)
    recall = ray.get(memory_actor.recall.remote("acme", "ann", "s1", "Where do I live?"))
    assert "The user lives in Bergen." in [f.text for f in recall.facts]
    assert recall.turns  # the session's window came back too
    assert ray.get(memory_actor.get_memory.remote("acme", "ann", added["memory"]["id"]))["origin"] == "api"


def test_tenants_do_not_see_each_other(memory_actor):
    import ray

    from cluster.errors import NotFoundError

    mine = ray.get(memory_actor.add_memory.remote("acme", "bob", "The user keeps bees."))
    ray.get(memory_actor.add_memory.remote("globex", "bob", "The user keeps goats."))
    acme = ray.get(memory_actor.search_memories.remote("acme", "bob", "bees"))
    globex = ray.get(memory_actor.list_memories.remote("globex", "bob"))
    assert [m["text"] for m in acme["data"]] == ["The user keeps bees."]
    assert [m["text"] for m in globex["data"]] == ["The user keeps goats."]
    with pytest.raises(NotFoundError):
        ray.get(memory_actor.delete_memory.remote("globex", "bob", mine["memory"]["id"]))
    usage = ray.get(memory_actor.usage.remote())
    assert set(usage) == {"acme", "globex"} and usage["acme"]["memories"] == 1
