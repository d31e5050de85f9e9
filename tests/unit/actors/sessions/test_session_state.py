"""SessionShard: the state model, tenant isolation, limits, settings, durability, GC, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

import actors.sessions.snapshot as snapshots
from actors.sessions.backup import backup_state, restore_state
from actors.sessions.log import list_segments
from actors.sessions.shard import SessionShard, new_session_id, shard_folder
from actors.sessions.snapshot import decode_state_table, list_archives, list_snapshots
from actors.sessions.storage import open_location
from cluster.errors import EngineDeadError, InvalidRequestError, NotFoundError
from cluster.state import SESSION_ID_RE, Message, ModelParameters, ModelState
from deployments.cli.state import state_app

DAY = 86_400.0


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the state model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"session_id": "sess-short"}, "session_id"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "a\nb"}, "tenant"),
        ({"updated_at": 0.5}, "updated_at"),
        ({"model_parameters": {"top_p": 0.0}}, "top_p"),
        ({"model_parameters": {"temperature": 3}}, "temperature"),
        ({"resource_usage": {"tokens_in": -1}}, "tokens_in"),
        ({"schema_version": 1}, "schema_version"),
        (
            {
                "conversation_context": {
                    "messages": [{"role": "tool", "content": "x", "timestamp": 1, "turn_id": 0}]
                }
            },
            "role",
        ),
        (
            {
                "turn_count": 0,
                "conversation_context": {
                    "messages": [{"role": "user", "content": "x", "timestamp": 1, "turn_id": 0}]
                },
            },
            "turn_count",
        ),
    ],
)
def test_model_state_validation_names_the_field(change: dict, field: str) -> None:
    base = {
        "session_id": "sess-" + "x" * 20,
        "tenant": "acme",
        "created_at": 1.0,
        "updated_at": 2.0,
        "turn_count": 1,
    }
    with pytest.raises(ValidationError) as caught:
        ModelState.model_validate({**base, **change})
    assert field in str(caught.value)


def test_turn_ids_may_not_decrease() -> None:
    messages = [
        Message(role="user", content="b", timestamp=1, turn_id=1),
        Message(role="user", content="a", timestamp=1, turn_id=0),
    ]
    with pytest.raises(ValidationError, match="must not decrease"):
        ModelState(
            session_id="sess-" + "x" * 20,
            tenant="t",
            created_at=1,
            updated_at=1,
            turn_count=2,
            conversation_context={"messages": messages},
        )


def test_parameter_overrides_merge_without_clearing() -> None:
    base = ModelParameters(temperature=0.2, max_tokens=50)
    merged = base.merged({"max_tokens": 10, "temperature": None})
    assert (merged.temperature, merged.max_tokens) == (0.2, 10)


def test_session_ids_are_unguessable() -> None:
    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(SESSION_ID_RE.match(i) for i in ids)
    randoms = [i.removeprefix("sess-") for i in ids]
    assert min(len(r) for r in randoms) >= 32  # 24 random bytes, base64url
    # no shared prefix beyond chance: ids carry no counter or clock
    assert len({r[:4] for r in randoms}) > 1900


# -- sessions -------------------------------------------------------------------------------


def test_create_get_list_delete_and_tenant_isolation(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path))
        a = await shard.create("acme", system_prompt="Be brief.", metadata={"k": "v"}, user="ann")
        b = await shard.create("beta")
        assert a["id"] != b["id"] and a["turns"] == 0
        assert await shard.append(a["id"], "acme", user("hi")) == 1
        got = await shard.get(a["id"], "acme")
        assert got["messages"] == [{"role": "user", "content": "hi"}] and got["metadata"] == {
            "k": "v"
        }
        assert await shard.context(a["id"], "acme") == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]
        assert [s["id"] for s in await shard.list_sessions("acme")] == [a["id"]]
        assert await shard.list_sessions("nobody") == []
        missing = "sess-" + "z" * 30
        for call in (
            lambda: shard.get(a["id"], "beta"),
            lambda: shard.append(a["id"], "beta", user("steal")),
            lambda: shard.delete(a["id"], "beta"),
            lambda: shard.update(a["id"], "beta", system_prompt="x"),
            lambda: shard.get(missing, "acme"),
        ):
            with pytest.raises(NotFoundError) as caught:
                await call()
            assert caught.value.status_code == 404
            assert re.sub(r"'sess-[^']+'", "ID", caught.value.message) == (
                "session_id=ID does not exist (or belongs to another tenant)"
            )
        assert (await shard.get(a["id"], "acme"))["turns"] == 1  # the foreign append did nothing
        assert await shard.delete(a["id"], "acme") is True
        with pytest.raises(NotFoundError):
            await shard.get(a["id"], "acme")
        await shard.close()

    run(go)


def test_shapes_match_what_the_ingress_session_client_reads(tmp_path) -> None:
    """The calls and shapes ``deployments.ingress.stores.sessions.SessionClient`` uses on a store shard."""
    from actors.sessions.requests import new_session_id, shard_for
    from deployments.protocol import SessionInfo

    async def go() -> None:
        shard = SessionShard(str(tmp_path), max_sessions=10)
        sid = new_session_id()
        created = await shard.create("acme", sid, "Be brief.", {"k": "v"})
        info = SessionInfo.model_validate(created)
        assert (info.id, info.system_prompt, info.metadata) == (sid, "Be brief.", {"k": "v"})
        turn = user("q") + [{"role": "assistant", "content": "a"}]
        assert await shard.append(sid, "acme", turn, request_id="r1") == 2
        assert await shard.append(sid, "acme", turn, request_id="r1") == 2  # a retry: stored once
        assert await shard.context(sid, "acme") == [{"role": "system", "content": "Be brief."}] + turn
        assert SessionInfo.model_validate(await shard.get(sid, "acme")).id == sid
        assert [s["id"] for s in await shard.list_sessions("acme")] == [sid]
        assert await shard.delete(sid, "acme") is True
        assert 0 <= shard_for(sid, 4) < 4 and shard_for(sid, 4) == shard_for(sid, 4)
        await shard.close()

    run(go)


def test_limits_give_clear_errors(tmp_path) -> None:
    limits = {
        "max_sessions_per_tenant": 2,
        "max_turns_per_session": 2,
        "max_messages_per_turn": 2,
        "max_message_chars": 10,
        "max_sessions": 3,
    }

    async def go() -> None:
        shard = SessionShard(str(tmp_path), limits=limits)
        s1 = (await shard.create("acme"))["id"]
        await shard.create("acme")
        with pytest.raises(InvalidRequestError, match="max_sessions_per_tenant=2"):
            await shard.create("acme")
        await shard.create("beta")
        with pytest.raises(InvalidRequestError, match="max_sessions=3"):
            await shard.create("gamma")
        with pytest.raises(InvalidRequestError, match="max_messages_per_turn=2"):
            await shard.append(s1, "acme", user("a") * 3)
        with pytest.raises(InvalidRequestError, match="max_message_chars=10"):
            await shard.append(s1, "acme", user("x" * 11))
        with pytest.raises(InvalidRequestError, match="role"):
            await shard.append(s1, "acme", [{"role": "robot", "content": "x"}])
        await shard.append(s1, "acme", user("1"))
        await shard.append(s1, "acme", user("2"))
        with pytest.raises(
            InvalidRequestError, match="max_turns_per_session=2; start a new session"
        ):
            await shard.append(s1, "acme", user("3"))
        with pytest.raises(InvalidRequestError, match="malformed"):
            await shard.create("beta", session_id="guessable-1")
        await shard.close()

    run(go)


def test_settings_system_prompt_and_overrides_are_durable(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path))
        sid = (await shard.create("acme", model_parameters={"temperature": 0.1}))["id"]
        await shard.update(
            sid, "acme", system_prompt="Answer in French.", model_parameters={"max_tokens": 32}
        )
        assert await shard.effective_parameters(sid, "acme", {"temperature": 0.9, "top_k": 3}) == {
            "temperature": 0.9,
            "max_tokens": 32,
            "top_k": 3,
        }
        with pytest.raises(InvalidRequestError, match="top_p"):
            await shard.effective_parameters(sid, "acme", {"top_p": 2})
        reopened = SessionShard(str(tmp_path))
        assert (await reopened.context(sid, "acme"))[0] == {
            "role": "system",
            "content": "Answer in French.",
        }
        assert await reopened.effective_parameters(sid, "acme") == {
            "temperature": 0.1,
            "max_tokens": 32,
        }
        await reopened.update(sid, "acme", clear=["system_prompt", "model_parameters"])
        assert await reopened.context(sid, "acme") == []
        assert await reopened.effective_parameters(sid, "acme") == {}

    run(go)


def test_concurrent_appends_get_distinct_ordered_turns_and_usage(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path))
        sid = (await shard.create("acme"))["id"]
        await asyncio.gather(
            *(
                shard.append(
                    sid,
                    "acme",
                    user(f"m{i}"),
                    usage={"tokens_in": 2, "kv_bytes_held": i},
                    metrics={"ttft_ms": 5.0, "e2e_ms": 20.0},
                )
                for i in range(40)
            )
        )
        state = await shard.state(sid, "acme")
        assert [m.turn_id for m in state.conversation_context.messages] == list(range(40))
        assert [m.content for m in state.conversation_context.messages] == [
            f"m{i}" for i in range(40)
        ]
        assert state.resource_usage.tokens_in == 80 and state.resource_usage.kv_bytes_held == 39
        assert [m.turn_id for m in state.performance_metrics] == list(range(40))
        assert shard.stats()["batches"] < 41  # group commit shared writes

    run(go)


def test_retried_request_id_is_not_applied_twice(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path))
        sid = (await shard.create("acme"))["id"]
        assert await shard.append(sid, "acme", user("once"), request_id="req-1") == 1
        assert await shard.append(sid, "acme", user("once"), request_id="req-1") == 1
        restarted = SessionShard(str(tmp_path))  # also after a restart
        assert await restarted.append(sid, "acme", user("once"), request_id="req-1") == 1
        assert (await restarted.get(sid, "acme"))["turns"] == 1

    run(go)


def test_acknowledged_turns_survive_a_dropped_shard_and_a_torn_tail(tmp_path) -> None:
    async def go() -> dict:
        shard = SessionShard(str(tmp_path))
        sids = [(await shard.create("acme"))["id"] for _ in range(4)]
        for i in range(5):
            await asyncio.gather(*(shard.append(s, "acme", user(f"{s}-{i}")) for s in sids))
        return {s: (await shard.get(s, "acme"))["messages"] for s in sids}  # shard dropped unclosed

    acked = run(go)
    (segment,) = list_segments(open_location(str(tmp_path / shard_folder(0))))
    with open(tmp_path / shard_folder(0) / segment.name, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage-of-a-cut-write")

    async def check() -> None:
        shard = SessionShard(str(tmp_path))
        report = await shard.open()
        assert report["torn_records"] == 1 and report["sessions"] == 4
        assert {s: (await shard.get(s, "acme"))["messages"] for s in acked} == acked
        await shard.append(next(iter(acked)), "acme", user("after"))  # writes a new segment
        assert len(list_segments(open_location(str(tmp_path / shard_folder(0))))) == 2

    run(check)


def test_snapshot_truncates_the_log_and_recovery_replays_the_tail(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path), snapshot_every_records=10**9)
        sid = (await shard.create("acme"))["id"]
        for i in range(6):
            await shard.append(sid, "acme", user(f"a{i}"))
        report = await shard.snapshot()
        assert report["covered_lsn"] == 7 and report["segments_removed"]
        for i in range(3):
            await shard.append(sid, "acme", user(f"b{i}"))
        before = (await shard.state(sid, "acme")).model_dump()
        again = SessionShard(str(tmp_path))
        recovered = await again.open()
        assert recovered["snapshot"] == report["snapshot"] and recovered["replayed_records"] == 3
        assert (await again.state(sid, "acme")).model_dump() == before

    run(go)


def test_periodic_snapshot_after_n_records(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path), snapshot_every_records=5)
        sid = (await shard.create("acme"))["id"]
        for i in range(6):
            await shard.append(sid, "acme", user(str(i)))
        await shard.close()
        assert list_snapshots(open_location(str(tmp_path / shard_folder(0))))

    run(go)


def test_log_write_error_reloads_the_shard_from_storage(tmp_path) -> None:
    async def go() -> None:
        shard = SessionShard(str(tmp_path))
        sid = (await shard.create("acme"))["id"]
        await shard.append(sid, "acme", user("kept"))
        wal = shard._log
        real = wal._sink.write

        def half_written(first_lsn: int, frames: bytes) -> str:
            real(first_lsn, frames[: len(frames) // 2])  # a torn write, then the error
            raise OSError(5, "I/O error")

        wal._sink.write = half_written
        with pytest.raises(EngineDeadError):
            await shard.append(sid, "acme", user("lost"))
        assert await shard.append(sid, "acme", user("next")) == 2  # reloaded, then appended
        state = await shard.state(sid, "acme")
        assert [(m.content, m.turn_id) for m in state.conversation_context.messages] == [
            ("kept", 0),
            ("next", 1),
        ]

    run(go)


# -- cleanup --------------------------------------------------------------------------------


def test_gc_archives_then_deletes_idle_sessions_and_reports(tmp_path) -> None:
    clock = Clock()

    async def go() -> None:
        shard = SessionShard(
            str(tmp_path), limits={"ttl_s": DAY, "archive_retention_s": 10 * DAY}, clock=clock
        )
        old = (await shard.create("acme"))["id"]
        await shard.append(old, "acme", user("old"))
        clock.now += 2 * DAY
        fresh = (await shard.create("acme"))["id"]
        stale_tmp = tmp_path / shard_folder(0) / "snapshots" / "x.parquet.1234.tmp"
        stale_tmp.parent.mkdir(parents=True, exist_ok=True)
        stale_tmp.write_bytes(b"cut")
        os.utime(stale_tmp, (1, 1))
        report = await shard.gc()
        assert [e["session_id"] for e in report["expired_sessions"]] == [old]
        assert report["expired_sessions"][0]["idle_s"] >= DAY
        assert report["segments_removed"] and report["temporary_files_removed"] == [
            "snapshots/x.parquet.1234.tmp"
        ]
        archived = decode_state_table(
            (tmp_path / shard_folder(0) / report["archive"]).read_bytes(), "a"
        )
        assert [s.session_id for s in archived.states] == [old]
        assert archived.states[0].conversation_context.messages[0].content == "old"
        with pytest.raises(NotFoundError):
            await shard.get(old, "acme")
        assert (await shard.get(fresh, "acme"))["id"] == fresh
        assert (await SessionShard(str(tmp_path)).list_sessions("acme"))[0]["id"] == fresh
        clock.now += 11 * DAY
        later = await shard.gc()
        assert later["archives_removed"] == [report["archive"]]
        assert [e["session_id"] for e in later["expired_sessions"]] == [fresh]
        assert len(list_archives(open_location(str(tmp_path / shard_folder(0))))) == 1

    run(go)


def test_gc_keeps_a_session_changed_while_it_was_archived(tmp_path) -> None:
    clock = Clock()

    async def go() -> None:
        shard = SessionShard(str(tmp_path), limits={"ttl_s": DAY}, clock=clock)
        touched = (await shard.create("acme"))["id"]
        queued = (await shard.create("acme"))["id"]
        idle = (await shard.create("acme"))["id"]
        clock.now += 2 * DAY
        expired = await shard.idle_sessions(clock.now)
        seen = {s.session_id: s.last_lsn for s in expired}
        assert set(seen) == {touched, queued, idle}
        await shard.append(touched, "acme", user("still here"))  # while the archive is written
        in_flight = asyncio.ensure_future(shard.append(queued, "acme", user("queued")))
        await asyncio.sleep(0)  # the turn is in the log's queue, not yet committed
        assert await shard.delete_unchanged(seen, reason="ttl") == [idle]
        assert await in_flight == 1
        assert {s["id"] for s in await shard.list_sessions("acme")} == {touched, queued}

    run(go)


# -- the CLI --------------------------------------------------------------------------------


def _populate(root: Path) -> dict[str, list]:
    async def go() -> dict[str, list]:
        out = {}
        for shard_id in (0, 1):
            shard = SessionShard(str(root), shard_id)
            sid = (await shard.create(f"t{shard_id}"))["id"]
            await shard.append(
                sid, f"t{shard_id}", user("q") + [{"role": "assistant", "content": "a"}]
            )
            out[sid] = (await shard.get(sid, f"t{shard_id}"))["messages"]
            await shard.close()
        return out

    return run(go)


def test_cli_backup_verify_restore_gc(tmp_path) -> None:
    cli = CliRunner()
    root, backup = tmp_path / "root", tmp_path / "backup"
    sessions = _populate(root)
    done = cli.invoke(state_app, ["backup", "--root", str(root), "--to", str(backup)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["sessions"] == 2
    checked = cli.invoke(state_app, ["verify", str(backup)])
    assert checked.exit_code == 0 and json.loads(checked.stdout)["ok"] is True
    refused = cli.invoke(state_app, ["restore", "--from", str(backup), "--root", str(root)])
    assert refused.exit_code == 1 and "--force" in refused.output
    restored = cli.invoke(
        state_app, ["restore", "--from", str(backup), "--root", str(tmp_path / "new")]
    )
    assert restored.exit_code == 0, restored.output

    async def read_back() -> dict[str, list]:
        out = {}
        for shard_id in (0, 1):
            for s in await SessionShard(str(tmp_path / "new"), shard_id).list_sessions(
                f"t{shard_id}"
            ):
                out[s["id"]] = (
                    await SessionShard(str(tmp_path / "new"), shard_id).get(s["id"], f"t{shard_id}")
                )["messages"]
        return out

    assert run(read_back) == sessions
    assert cli.invoke(state_app, ["gc", "--root", str(root)]).exit_code == 2  # needs --offline
    collected = cli.invoke(state_app, ["gc", "--root", str(root), "--offline", "--ttl-s", "1e12"])
    assert collected.exit_code == 0, collected.output
    assert set(json.loads(collected.stdout)["shards"]) == {"shard-000", "shard-001"}
    snapshot = next((backup / "shard-000" / "snapshots").iterdir())
    snapshot.write_bytes(snapshot.read_bytes()[:-1] + b"X")
    damaged = cli.invoke(state_app, ["verify", str(backup)])
    assert damaged.exit_code == 1 and "SHA-256" in damaged.output


def test_backup_reads_again_when_a_snapshot_races_it(tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "root")

    async def write() -> str:
        shard = SessionShard(root)
        sid = (await shard.create("acme"))["id"]
        await shard.append(sid, "acme", user("in the snapshot"))
        await shard.snapshot()
        await shard.append(sid, "acme", user("in the log only"))
        return sid

    sid = run(write)
    real_read_log, raced = snapshots.read_log, []

    def read_log_while_a_writer_snapshots(*args: Any, **kwargs: Any):
        if not raced:  # the live shard snapshots (and drops the segments) between our reads
            raced.append(True)
            run(lambda: SessionShard(root).snapshot())
        return real_read_log(*args, **kwargs)

    monkeypatch.setattr(snapshots, "read_log", read_log_while_a_writer_snapshots)
    manifest = backup_state(root, str(tmp_path / "backup"))
    assert raced and manifest.turns == 2 and manifest.messages == 2
    restored = str(tmp_path / "restored")
    restore_state(str(tmp_path / "backup"), restored)
    assert [
        m["content"] for m in run(lambda: SessionShard(restored).get(sid, "acme"))["messages"]
    ] == ["in the snapshot", "in the log only"]
