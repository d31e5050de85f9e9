"""A memory shard reaches its steady resident memory when it starts, not at its first write.

A session deleted within ``persist_interval_s`` of its last turn is never written, so when a
shard first writes Parquet depends on traffic. That first write used to add ~11 MB to the
process (~6 MB of mimalloc arenas, Arrow's default allocator, and ~5 MB of Parquet code paged
in), which the load test saw as growth between rounds (tests/load/test_memory_flat.py). Here a
fresh process, with the environment the application gives the memory actor, serves sessions
that are deleted before any write, then sessions that are written before they are deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config.app import build_app_config
from tests.conftest import REPO_ROOT

# Five written sessions add ~1,200-1,500 KiB (the worker thread's malloc arena, a little code);
# without the system allocator they added ~7,200 KiB, without the warm-up ~6,000 KiB, without
# both ~13,800 KiB.
GROWTH_LIMIT_KIB = 3072

SCRIPT = r"""
import asyncio, json, sys

from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from engine.embedding.embedders import HashingEmbedder


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssAnon", "RssFile")))


async def conversation(shard, sid: str, write: bool) -> None:
    for turn in range(2):
        text = f"conversation {sid} turn {turn}: I live in Oslo and ride a red bicycle."
        await shard.absorb_turn("acme", f"session:{sid}", sid, turn,
                                [{"role": "user", "content": text}, {"role": "assistant", "content": text}])
    await shard.drain()
    if write:
        assert (await shard.flush())["users"] == 1
    await shard.forget_session("acme", sid)


async def main(root: str) -> None:
    config = MemoryConfig(embedder="hashing", storage_uri=root, persist_interval_s=3600.0)
    # a still clock: no metrics publishing (it imports Ray) or cleanup inside the measurement
    shard = MemoryShard(config, embedder=HashingEmbedder(), clock=lambda: 1.7e9)
    for i in range(20):  # warm: every part but the write
        await conversation(shard, f"unwritten-{i}", write=False)
    before = resident_kib()
    for i in range(5):
        await conversation(shard, f"written-{i}", write=True)
    print(json.dumps({"grew_kib": resident_kib() - before, "users": len(shard.loaded_users())}))


asyncio.run(main(sys.argv[1]))
"""


def memory_actor_env() -> dict[str, str]:
    """The environment variables the application starts a memory shard's process with."""
    from deployments.app import memory_actors

    config = build_app_config({"memory": {"embedder": "hashing"}}, "test config")
    runtime_env = memory_actors(config)[0].actor_options.get("runtime_env", {})
    return dict(runtime_env.get("env_vars", {}))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_the_first_writes_of_deleted_sessions_leave_resident_memory_flat(tmp_path):
    env = {**os.environ, **memory_actor_env(), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["users"] == 0  # every session's user went with it
    assert result["grew_kib"] < GROWTH_LIMIT_KIB, result


@pytest.mark.parametrize("stored", [False, True])
def test_reads_of_unknown_users_keep_nothing_and_stored_users_are_read_whole(tmp_path, stored):
    """Listing, searching or getting the memories of a user id that holds nothing answers
    empty (or 404) and leaves no user loaded: reads of arbitrary ids must not grow the shard.
    A user that holds memories is read (and kept) as before."""
    import time

    from actors.memory.shard import MemoryShard
    from cluster.config.memory import MemoryConfig
    from cluster.errors import NotFoundError
    from engine.embedding.embedders import HashingEmbedder
    from engine.fake_engine import ByteTokenizer

    config = {"embedder": "hashing", "persist_interval_s": 0.01}
    if stored:
        config["storage_uri"] = str(tmp_path)

    async def run() -> None:
        shard = MemoryShard(MemoryConfig(**config), tokenizer=ByteTokenizer(), embedder=HashingEmbedder(),
                            clock=time.time)
        for i in range(50):
            listed = await shard.list_memories("acme", f"nobody-{i}")
            assert listed["data"] == [] and listed["total"] == 0
            assert (await shard.search_memories("acme", f"nobody-{i}", "where do I live"))["data"] == []
            with pytest.raises(NotFoundError):
                await shard.get_memory("acme", f"nobody-{i}", "mem-missing")
        assert shard.loaded_users() == []
        added = await shard.add_memory("acme", "alice", "Alice lives in Oslo.")
        await shard.drain()
        await shard.close()
        again = MemoryShard(MemoryConfig(**config), tokenizer=ByteTokenizer(), embedder=HashingEmbedder(),
                            clock=time.time)
        if stored:  # read from storage after a restart, and kept
            got = await again.get_memory("acme", "alice", added["memory"]["id"])
            assert got["id"] == added["memory"]["id"]
            assert [m.user for m in again.loaded_users()] == ["alice"]
        await again.close()

    asyncio.run(run())
