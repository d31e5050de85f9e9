"""Session persistence on local disk and on S3 (moto's server on loopback), same suite.

A writer killed in the middle of a stream of turns, a shard dropped without closing, then
recovery: every acknowledged turn is there, none twice. Backup, wipe, restore, compare.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.sessions.backup import backup_state, restore_state, verify_backup
from actors.sessions.shard import SessionShard
from actors.sessions.storage import open_location
from cluster.errors import InvalidRequestError

REPO_ROOT = Path(__file__).resolve().parents[2]

CRASH_CHILD = """
import asyncio, sys
from actors.sessions.shard import SessionShard

async def main(root: str, sessions: int) -> None:
    shard = SessionShard(root, 0)
    sids = [(await shard.create("crash"))["id"] for _ in range(sessions)]

    async def writer(sid: str) -> None:
        turn = 0
        while True:
            await shard.append(sid, "crash", [{"role": "user", "content": f"{sid}:{turn}"}])
            sys.stdout.write(f"ACK {sid} {turn}\\n")  # only after the append returned
            sys.stdout.flush()
            turn += 1

    await asyncio.gather(*(writer(s) for s in sids))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 (moto), stopped by its PID afterwards."""
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on port {port}")
            time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(params=["local", "s3"])
def make_uri(request, tmp_path) -> Callable[[str], str]:
    """``make_uri(name)``: a fresh state location on the backend under test."""
    if request.param == "local":
        return lambda name: str(tmp_path / name)
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"m-ai-{uuid.uuid4().hex[:12]}"
    query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    base = f"s3://testing:testing@{bucket}"
    open_location(f"{base}?{query}&allow_bucket_creation=true").fs.create_dir(bucket)
    return lambda name: f"{base}/{name}?{query}"


def run(fn: Callable[[], Any]) -> Any:
    return asyncio.run(fn())


async def _dump(root: str, shard_ids: list[int], tenants: list[str]) -> dict[str, dict]:
    """Every session of the given shards, as ``ModelState`` dicts, read by fresh shards."""
    out = {}
    for shard_id in shard_ids:
        shard = SessionShard(root, shard_id)
        for tenant in tenants:
            for summary in await shard.list_sessions(tenant):
                out[summary["id"]] = (await shard.state(summary["id"], tenant)).model_dump()
    return out


@pytest.mark.timeout(120)
def test_killed_writer_loses_no_acknowledged_turn(make_uri) -> None:
    root = make_uri("state")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, root, "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    acked: dict[str, int] = {}
    lines = 0
    while lines < 60:
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"the writer died early: {child.stderr.read()[-2000:]}")
        _, sid, turn = line.split()
        acked[sid] = max(acked.get(sid, -1), int(turn))
        lines += 1
    os.kill(child.pid, signal.SIGKILL)  # in the middle of appends: no close, no flush
    for line in child.stdout.read().splitlines():  # acks printed before the kill count too
        _, sid, turn = line.split()
        acked[sid] = max(acked.get(sid, -1), int(turn))
    child.wait()
    child.stderr.close()
    child.stdout.close()

    async def check() -> None:
        shard = SessionShard(root, 0)
        await shard.open()
        for sid, last in acked.items():
            state = await shard.state(sid, "crash")
            messages = state.conversation_context.messages
            # contiguous turns from 0, each once; an unacknowledged last turn may be there too
            assert [m.content for m in messages] == [f"{sid}:{i}" for i in range(len(messages))]
            assert [m.turn_id for m in messages] == list(range(len(messages)))
            assert len(messages) - 1 >= last, (sid, last, len(messages))
        # and the shard goes on from there
        sid = next(iter(acked))
        count = await shard.append(sid, "crash", [{"role": "user", "content": "after"}])
        assert (await SessionShard(root, 0).get(sid, "crash"))["message_count"] == count

    run(check)


@pytest.mark.timeout(120)
def test_dropped_shards_recover_snapshot_plus_log(make_uri) -> None:
    root = make_uri("state")

    async def write() -> dict[str, dict]:
        shards = [SessionShard(root, i, snapshot_every_records=10**9) for i in (0, 1)]
        sids = [
            (await shards[i % 2].create(f"t{i % 2}", system_prompt=f"p{i}"))["id"] for i in range(4)
        ]
        for turn in range(4):
            if turn == 2:
                await asyncio.gather(*(s.snapshot() for s in shards))
            await asyncio.gather(
                *(
                    shards[i % 2].append(
                        sid,
                        f"t{i % 2}",
                        [
                            {"role": "user", "content": f"{turn}"},
                            {"role": "assistant", "content": f"r{turn}"},
                        ],
                    )
                    for i, sid in enumerate(sids)
                )
            )
        await shards[1].update(sids[1], "t1", model_parameters={"temperature": 0.5})
        await shards[0].delete(sids[2], "t0")
        return {
            s: (await shards[i % 2].state(s, f"t{i % 2}")).model_dump()
            for i, s in enumerate(sids)
            if i != 2
        }

    before = run(write)  # the shard objects are dropped here without close()
    after = run(lambda: _dump(root, [0, 1], ["t0", "t1"]))
    assert after == before
    assert all(len(s["conversation_context"]["messages"]) == 8 for s in after.values())


@pytest.mark.timeout(120)
def test_backup_wipe_restore_compare(make_uri) -> None:
    root, backup = make_uri("state"), make_uri("backups/b1")
    clock = [time.time()]

    async def write() -> None:
        for shard_id in (0, 1):
            shard = SessionShard(root, shard_id, limits={"ttl_s": 3600}, clock=lambda: clock[0])
            doomed = (await shard.create("acme"))["id"]
            await shard.append(doomed, "acme", [{"role": "user", "content": "to archive"}])
            clock[0] += 7200
            for n in range(3):
                sid = (await shard.create("acme", metadata={"n": str(n)}))["id"]
                await shard.append(sid, "acme", [{"role": "user", "content": f"s{shard_id}n{n}"}])
            await shard.gc()  # archive + snapshot; then a log tail after it
            await shard.append(sid, "acme", [{"role": "assistant", "content": "tail"}])
            await shard.close()

    run(write)
    before = run(lambda: _dump(root, [0, 1], ["acme"]))
    assert len(before) == 6
    manifest = backup_state(root, backup, at=clock[0])  # the shards' (fake) clock
    assert manifest.sessions == 6 and manifest.turns == 8
    assert sum(len(s.archives) for s in manifest.shards) == 2
    assert verify_backup(backup)["ok"] is True
    with pytest.raises(InvalidRequestError, match="not empty"):
        backup_state(root, backup)
    with pytest.raises(InvalidRequestError, match="force"):
        restore_state(backup, root)
    open_location(root).wipe()
    assert run(lambda: _dump(root, [0, 1], ["acme"])) == {}
    report = restore_state(backup, root)
    assert report["sessions"] == 6
    assert run(lambda: _dump(root, [0, 1], ["acme"])) == before
    # a damaged backup is caught by verify and refused by restore
    target = open_location(backup)
    name = manifest.shards[0].snapshot.path
    target.write_atomic(name, target.read_bytes(name)[:-3])
    checked = verify_backup(backup)
    assert not checked["ok"] and any(name in p for p in checked["problems"])


@pytest.mark.timeout(120)
def test_backup_is_a_point_in_time(make_uri) -> None:
    root, backup, restored = make_uri("state"), make_uri("b"), make_uri("restored")

    async def write() -> tuple[str, float]:
        shard = SessionShard(root, 0)
        sid = (await shard.create("acme"))["id"]
        await shard.append(sid, "acme", [{"role": "user", "content": "before the cut"}])
        cut = time.time()
        await asyncio.sleep(0.02)
        await shard.append(sid, "acme", [{"role": "user", "content": "after the cut"}])
        return sid, cut

    sid, cut = run(write)
    backup_state(root, backup, at=cut)
    restore_state(backup, restored)

    async def read() -> list[dict]:
        return (await SessionShard(restored, 0).get(sid, "acme"))["messages"]

    assert run(read) == [{"role": "user", "content": "before the cut"}]
