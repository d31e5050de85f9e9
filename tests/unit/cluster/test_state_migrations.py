"""Data written with an older schema version loads into the current shape."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cluster.state as state_module
from actors.sessions.log import SEGMENT_MAGIC, encode_frame
from actors.sessions.shard import SessionShard, shard_folder
from cluster.errors import CheckpointError
from cluster.state import STATE_SCHEMA_VERSION, load_record, load_state, migration, upgrade

OLD = 1
SID_A = "sess-" + "A" * 24
SID_B = "sess-" + "B" * 24


def v1_session(sid: str, tenant: str, turns: int, lsn: int) -> dict:
    """A session as M-AI wrote it with schema version 1."""
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "text": f"q{turn}", "ts": 100.0 + turn, "turn": turn})
        messages.append({"role": "assistant", "text": f"a{turn}", "ts": 100.5 + turn, "turn": turn})
    return {
        "schema_version": OLD,
        "session_id": sid,
        "tenant": tenant,
        "user": "u1",
        "system": "You are terse.",
        "params": {"temperature": 0.3, "max_tokens": 64},
        "messages": messages,
        "usage": {"prompt_tokens": 10 * turns, "completion_tokens": 20 * turns},
        "metadata": {"topic": "old"},
        "turns": turns,
        "lsn": lsn,
        "created": 99.0,
        "updated": 100.5 + max(turns - 1, 0),
    }


@pytest.fixture
def v1_root(tmp_path):
    """A shard root written by schema version 1: a snapshot (v1 table) and a v1 log."""
    shard = tmp_path / shard_folder(0)
    (shard / "snapshots").mkdir(parents=True)
    (shard / "wal").mkdir()
    row = v1_session(SID_A, "acme", turns=2, lsn=3)
    table = pa.table(  # the v1 table had fewer columns
        {
            "session_id": [SID_A],
            "tenant": ["acme"],
            "schema_version": pa.array([OLD], pa.int16()),
            "state": [json.dumps(row)],
        }
    ).replace_schema_metadata({"m_ai.covered_lsn": "3", "m_ai.covered_ts": "101.5"})
    pq.write_table(table, shard / "snapshots" / f"{3:020d}.parquet")
    records = [
        {
            "lsn": 4,
            "ts": 200.0,
            "session_id": SID_B,
            "tenant": "beta",
            "op": "create",
            "data": v1_session(SID_B, "beta", turns=0, lsn=0),
        },
        {
            "lsn": 5,
            "ts": 201.0,
            "session_id": SID_B,
            "tenant": "beta",
            "op": "append",
            "data": {
                "turn": 0,
                "messages": [{"role": "user", "text": "hello", "ts": 201.0}],
                "usage": {"prompt_tokens": 3},
            },
        },
        {
            "lsn": 6,
            "ts": 202.0,
            "session_id": SID_A,
            "tenant": "acme",
            "op": "update",
            "data": {"system": "You are verbose."},
        },
        {
            "lsn": 7,
            "ts": 203.0,
            "session_id": SID_A,
            "tenant": "acme",
            "op": "append",
            "data": {"turn": 2, "messages": [{"role": "user", "text": "q2", "ts": 203.0}]},
        },
    ]
    frames = b"".join(encode_frame(json.dumps(r).encode(), version=OLD) for r in records)
    (shard / "wal" / f"{4:020d}-old.seg").write_bytes(SEGMENT_MAGIC + frames)
    return tmp_path


def test_old_snapshot_and_log_load_in_the_current_shape(v1_root) -> None:
    async def run() -> None:
        shard = SessionShard(str(v1_root), 0)
        report = await shard.open()
        assert report["migrated"] == 5  # one snapshot row + four log records
        a = await shard.state(SID_A, "acme")
        assert a.schema_version == STATE_SCHEMA_VERSION
        assert a.conversation_context.system_prompt == "You are verbose."
        contents = [(m.role, m.content, m.turn_id) for m in a.conversation_context.messages]
        assert contents == [
            ("user", "q0", 0),
            ("assistant", "a0", 0),
            ("user", "q1", 1),
            ("assistant", "a1", 1),
            ("user", "q2", 2),
        ]
        assert a.turn_count == 3 and a.last_lsn == 7
        assert a.model_parameters.temperature == 0.3 and a.model_parameters.max_tokens == 64
        assert (a.resource_usage.tokens_in, a.resource_usage.tokens_out) == (20, 40)
        assert a.conversation_context.messages[0].timestamp == 100.0
        b = await shard.state(SID_B, "beta")
        assert [m.content for m in b.conversation_context.messages] == ["hello"]
        assert b.resource_usage.tokens_in == 3
        # the migrated shard keeps working and writes the current version
        await shard.append(SID_A, "acme", [{"role": "assistant", "content": "a2"}])
        await shard.snapshot()
        await shard.close()
        again = SessionShard(str(v1_root), 0)
        assert (await again.open())["migrated"] == 0
        reloaded = await again.state(SID_A, "acme")
        assert reloaded.turn_count == 4
        assert reloaded.conversation_context.messages[-1].turn_id == 3

    asyncio.run(run())


def test_each_v1_record_kind_upgrades() -> None:
    delete = json.dumps(
        {"lsn": 9, "ts": 1.0, "session_id": SID_A, "tenant": "acme", "op": "delete"}
    ).encode()
    assert load_record(delete, OLD).op.kind == "delete"
    update = {
        "lsn": 8,
        "ts": 1.0,
        "session_id": SID_A,
        "tenant": "acme",
        "op": "update",
        "data": {"params": {"top_k": 5}},
    }
    record = load_record(json.dumps(update).encode(), OLD)
    assert record.op.model_parameters.top_k == 5
    assert load_state(json.dumps(v1_session(SID_A, "acme", 1, 2)), OLD).turn_count == 1


def test_newer_or_unknown_versions_are_refused() -> None:
    with pytest.raises(CheckpointError, match="newer than this M-AI"):
        upgrade("session", {}, STATE_SCHEMA_VERSION + 1)
    with pytest.raises(CheckpointError, match="no migration of session data from schema_version=0"):
        upgrade("session", {}, 0)
    with pytest.raises(CheckpointError, match="unknown v1 op"):
        load_record(
            json.dumps(
                {"lsn": 1, "ts": 1.0, "session_id": SID_A, "tenant": "t", "op": "x"}
            ).encode(),
            OLD,
        )


def test_migrations_chain_in_version_order(monkeypatch) -> None:
    """With a version 3, data of version 1 runs 1->2 then 2->3."""
    monkeypatch.setattr(state_module, "STATE_SCHEMA_VERSION", 3)
    monkeypatch.setattr(state_module, "MIGRATIONS", dict(state_module.MIGRATIONS))

    @migration("session", 2)
    def add_note(d: dict) -> dict:
        return {**d, "schema_version": 3, "metadata": {**d["metadata"], "note": "v3"}}

    out = state_module.upgrade("session", v1_session(SID_A, "acme", 1, 2), 1)
    assert out["schema_version"] == 3 and out["metadata"] == {"topic": "old", "note": "v3"}
    assert out["conversation_context"]["messages"][0]["content"] == "q0"  # the 1->2 step ran first
