"""The write-ahead log: framing, torn and corrupt records, group commit, segments, replay."""

from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest

from actors.sessions.log import (
    FRAME_HEADER,
    SEGMENT_MAGIC,
    SessionLog,
    decode_segment,
    encode_frame,
    encode_record,
    list_segments,
    read_log,
)
from actors.sessions.storage import open_location
from cluster.errors import CheckpointError, EngineDeadError
from cluster.state import (
    STATE_SCHEMA_VERSION,
    AppendOp,
    CreateOp,
    LogRecord,
    Message,
    ModelState,
    apply_record,
)

SID = "sess-" + "a" * 24


def create_record(lsn: int, sid: str = SID, tenant: str = "acme") -> LogRecord:
    state = ModelState(session_id=sid, tenant=tenant, created_at=1.0, updated_at=1.0)
    return LogRecord(
        lsn=lsn, ts=float(lsn), session_id=sid, tenant=tenant, op=CreateOp(state=state)
    )


def append_op(turn: int, ts: float = 1.0) -> AppendOp:
    message = Message(role="user", content=f"turn {turn}", timestamp=ts, turn_id=turn)
    return AppendOp(turn_id=turn, messages=[message])


def append_record(lsn: int, turn: int, sid: str = SID, tenant: str = "acme") -> LogRecord:
    return LogRecord(
        lsn=lsn, ts=float(lsn), session_id=sid, tenant=tenant, op=append_op(turn, float(lsn))
    )


def segment_of(records: list[LogRecord]) -> bytes:
    return SEGMENT_MAGIC + b"".join(encode_record(r) for r in records)


@pytest.fixture
def log_lines():
    """Records logged by the session log (its logger may not propagate to the root)."""
    lines: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    logger = logging.getLogger("m_ai.actors.sessions.log")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_frame_layout_is_length_crc_version_payload() -> None:
    frame = encode_frame(b'{"lsn":1}', version=STATE_SCHEMA_VERSION)
    length, crc, version = FRAME_HEADER.unpack_from(frame)
    assert (length, version) == (9, STATE_SCHEMA_VERSION)
    assert frame[FRAME_HEADER.size :] == b'{"lsn":1}'
    assert decode_segment(SEGMENT_MAGIC + frame, "s").frames == [
        (STATE_SCHEMA_VERSION, b'{"lsn":1}')
    ]
    # the CRC covers the version: the same payload under another version is rejected
    tampered = frame[:8] + struct.pack("<H", STATE_SCHEMA_VERSION + 1) + frame[10:]
    assert decode_segment(SEGMENT_MAGIC + tampered, "s").frames == []


def test_every_cut_of_the_last_record_is_a_torn_tail() -> None:
    records = [create_record(1), append_record(2, 0), append_record(3, 1)]
    whole = segment_of(records)
    last = len(encode_record(records[-1]))
    for cut in range(1, last):
        decoded = decode_segment(whole[: len(whole) - cut], "s")
        assert len(decoded.frames) == 2, cut
        assert decoded.torn_bytes == last - cut
    assert len(decode_segment(whole, "s").frames) == 3


def test_zero_filled_tail_and_partial_magic_are_torn() -> None:
    records = [create_record(1), append_record(2, 0)]
    decoded = decode_segment(segment_of(records) + b"\x00" * 300, "s")
    assert len(decoded.frames) == 2 and decoded.torn_bytes == 300
    assert decode_segment(SEGMENT_MAGIC[:3], "s").frames == []
    assert decode_segment(b"", "s").torn_at is None


def test_damage_followed_by_valid_records_is_corruption() -> None:
    records = [create_record(1), append_record(2, 0), append_record(3, 1)]
    data = bytearray(segment_of(records))
    second = len(SEGMENT_MAGIC) + len(encode_record(records[0]))
    data[second + FRAME_HEADER.size + 5] ^= 0xFF  # a bit flip inside record 2
    with pytest.raises(CheckpointError, match="corrupt at byte"):
        decode_segment(bytes(data), "wal/x.seg")
    kept = decode_segment(bytes(data), "wal/x.seg", skip_corrupt=True)
    assert len(kept.frames) == 1  # only what precedes the damage


def test_foreign_file_is_refused() -> None:
    with pytest.raises(CheckpointError, match="magic"):
        decode_segment(b"PAR1" + b"x" * 20, "wal/x.seg")


def test_read_log_skips_torn_tail_with_a_warning(tmp_path, log_lines) -> None:
    loc = open_location(str(tmp_path))
    records = [create_record(1), append_record(2, 0), append_record(3, 1)]
    data = segment_of(records)
    os.makedirs(tmp_path / "wal")
    (tmp_path / "wal" / f"{1:020d}-aa.seg").write_bytes(data[:-4])
    (tmp_path / "wal" / f"{4:020d}-bb.seg").write_bytes(segment_of([append_record(4, 2)]))
    scan = read_log(loc)
    assert [r.lsn for r in scan.records] == [1, 2, 4]
    assert scan.torn_records == 1
    assert any("torn" in line.getMessage() for line in log_lines if line.levelno == logging.WARNING)
    assert [r.lsn for r in read_log(loc, after_lsn=2).records] == [4]


def test_replay_is_idempotent() -> None:
    records = [create_record(1), append_record(2, 0), append_record(3, 1)]
    sessions: dict[str, ModelState] = {}
    assert [apply_record(sessions, r) for r in records] == ["applied"] * 3
    once = sessions[SID].model_dump()
    assert [apply_record(sessions, r) for r in records] == ["duplicate"] * 3
    # a second record carrying a turn id already held is not applied either
    assert apply_record(sessions, append_record(9, 1)) == "duplicate"
    assert sessions[SID].model_dump() == once
    assert [m.content for m in sessions[SID].conversation_context.messages] == ["turn 0", "turn 1"]


def _new_log(tmp_path, **options) -> tuple[SessionLog, list[list[LogRecord]]]:
    commits: list[list[LogRecord]] = []
    wal = SessionLog(open_location(str(tmp_path)), **options)
    wal.start(1, 0.0, [], commits.append)
    return wal, commits


def test_group_commit_acknowledges_after_durable_and_applied(tmp_path) -> None:
    async def run() -> None:
        wal, commits = _new_log(tmp_path)
        futures = [wal.submit(SID, "acme", append_op(i)) for i in range(64)]
        assert not any(f.done() for f in futures)
        done = await asyncio.gather(*futures)
        assert [r.lsn for r in done] == list(range(1, 65))
        assert sum(len(c) for c in commits) == 64
        assert wal.batches < 64  # concurrent records shared writes
        assert wal.durable_lsn == 64
        on_disk = read_log(open_location(str(tmp_path)))
        assert [r.lsn for r in on_disk.records] == list(range(1, 65))
        await wal.close()

    asyncio.run(run())


def test_object_mode_writes_one_object_per_commit(tmp_path) -> None:
    async def run() -> None:
        wal, _ = _new_log(tmp_path, mode="object")
        await wal.append(SID, "acme", create_record(1).op)
        await asyncio.gather(*(wal.append(SID, "acme", append_op(i)) for i in range(10)))
        segments = list_segments(open_location(str(tmp_path)))
        assert len(segments) == wal.batches >= 2
        assert [r.lsn for r in read_log(open_location(str(tmp_path))).records] == list(range(1, 12))

    asyncio.run(run())


def test_append_mode_rolls_segments_and_truncates_covered_ones(tmp_path) -> None:
    async def run() -> None:
        wal, _ = _new_log(tmp_path, segment_bytes=600)
        for i in range(12):
            await wal.append(SID, "acme", append_op(i))
        names = [s.name for s in list_segments(open_location(str(tmp_path)))]
        assert len(names) > 2
        removed = await wal.truncate(6)
        present = {r.lsn for r in read_log(open_location(str(tmp_path))).records}
        gone = set(range(1, 13)) - present
        assert removed and gone and max(gone) <= 6  # only covered records went
        assert present >= set(range(7, 13))
        assert wal.segments[-1].name == names[-1]  # the open segment stays

    asyncio.run(run())


def test_write_error_fails_waiters_and_stops_the_log(tmp_path) -> None:
    async def run() -> None:
        wal, commits = _new_log(tmp_path)

        def broken(first_lsn: int, frames: bytes) -> str:
            raise OSError(28, "No space left on device")

        wal._sink.write = broken  # type: ignore[method-assign]
        futures = [wal.submit(SID, "acme", append_op(i)) for i in range(3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results)
        assert commits == [] and wal.failed is not None
        with pytest.raises(EngineDeadError, match="reloads from storage"):
            wal.submit(SID, "acme", append_op(5))

    asyncio.run(run())
