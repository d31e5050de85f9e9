"""The write-ahead log of one session store shard, as segments under ``<shard>/wal/``.

Framing. A segment starts with ``SEGMENT_MAGIC``; then records, each framed as
``<u32 payload length> <u32 CRC32 of (version, payload)> <u16 schema version> <payload>``,
the payload being a ``LogRecord`` as JSON. A reader stops at the first frame that is short or
fails its CRC: when nothing valid follows it, it is a torn tail (a crash in the middle of a
write, never acknowledged) and is skipped with a warning; when a valid record follows it, the
segment is corrupt and loading fails unless ``skip_corrupt`` is set.

Segments, because object stores cannot append. Records get increasing log positions (LSN);
a segment is named ``wal/<first lsn, 20 digits>-<writer epoch>.seg``. Two sinks write them:

- ``append`` (local disk): one open file per writer, extended by each group commit with one
  ``write`` + ``fdatasync``; a new file at ``segment_bytes``, at every ``roll()`` and for every
  new writer (a restarted shard never appends after a possibly torn tail).
- ``object`` (S3, GCS, any ``pyarrow.fs``): each group commit is one new immutable object,
  written with one PUT, which the store makes visible whole or not at all.

Group commit: ``submit`` queues a record and returns a future; one flusher writes everything
queued so far as one batch, so concurrent turns share one fsync or one PUT. A turn is
acknowledged (its future resolved) only after its batch is durable and ``on_commit`` has
applied it. If a write fails the log stops accepting records (``failed``); its owner rebuilds
from storage, because an object may have landed although the call failed.

The API is asyncio, for one event loop (the store actor's); storage calls run in threads.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from actors.sessions.storage import LocalAppendFile, StateLocation
from cluster.errors import CheckpointError, EngineDeadError
from cluster.logging_setup import get_logger
from cluster.state import STATE_SCHEMA_VERSION, LogRecord, Op, load_record

log = get_logger("actors.sessions.log")

SEGMENT_MAGIC = b"MAIWAL\x00\x01"
FRAME_HEADER = struct.Struct("<IIH")
WAL_FOLDER = "wal"
SEGMENT_SUFFIX = ".seg"
MAX_RECORD_BYTES = 64 << 20
READ_THREADS = 16
_PAYLOAD_START = b'{"lsn":'  # every record's JSON starts so; used to spot frames after damage

SinkMode = Literal["auto", "append", "object"]


# -- framing --------------------------------------------------------------------------------


def encode_frame(payload: bytes, version: int = STATE_SCHEMA_VERSION) -> bytes:
    version_bytes = struct.pack("<H", version)
    crc = zlib.crc32(payload, zlib.crc32(version_bytes))
    return FRAME_HEADER.pack(len(payload), crc, version) + payload


def encode_record(record: LogRecord) -> bytes:
    return encode_frame(record.model_dump_json(exclude_none=True).encode("utf-8"))


def _frame_at(data: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """``(version, payload, end)`` of a valid frame at ``pos``, else None."""
    if pos + FRAME_HEADER.size > len(data):
        return None
    length, crc, version = FRAME_HEADER.unpack_from(data, pos)
    start = pos + FRAME_HEADER.size
    end = start + length
    if version == 0 or length == 0 or length > MAX_RECORD_BYTES or end > len(data):
        return None
    payload = data[start:end]
    if zlib.crc32(payload, zlib.crc32(data[pos + 8 : start])) != crc:
        return None
    return version, payload, end


def _valid_frame_after(data: bytes, start: int) -> bool:
    at = data.find(_PAYLOAD_START, start + FRAME_HEADER.size)
    while at != -1:
        if _frame_at(data, at - FRAME_HEADER.size) is not None:
            return True
        at = data.find(_PAYLOAD_START, at + 1)
    return False


@dataclass
class DecodedSegment:
    frames: list[tuple[int, bytes]]  # (schema version, payload)
    torn_bytes: int = 0
    torn_at: int | None = None


def decode_segment(data: bytes, name: str, *, skip_corrupt: bool = False) -> DecodedSegment:
    """The records of one segment, its torn tail cut off (see the module docstring)."""
    if len(data) < len(SEGMENT_MAGIC) and SEGMENT_MAGIC.startswith(data):
        return DecodedSegment([], len(data), 0 if data else None)
    if not data.startswith(SEGMENT_MAGIC):
        raise CheckpointError(
            f"{name} does not start with the M-AI log magic; remove foreign files from the wal folder"
        )
    frames: list[tuple[int, bytes]] = []
    pos = len(SEGMENT_MAGIC)
    while pos < len(data):
        frame = _frame_at(data, pos)
        if frame is None:
            if _valid_frame_after(data, pos):
                message = (
                    f"log segment {name} is corrupt at byte {pos}: a damaged record is followed "
                    f"by valid ones; restore a backup, or recover with skip_corrupt=True to drop "
                    f"the rest of this segment"
                )
                if not skip_corrupt:
                    raise CheckpointError(message)
                log.error(message)
            return DecodedSegment(frames, len(data) - pos, pos)
        frames.append((frame[0], frame[1]))
        pos = frame[2]
    return DecodedSegment(frames)


# -- segments on storage --------------------------------------------------------------------


@dataclass
class SegmentInfo:
    name: str  # relative to the shard location
    first_lsn: int
    last_lsn: int  # highest LSN it may hold (exact once read or written)


def segment_name(first_lsn: int, epoch: str) -> str:
    return f"{WAL_FOLDER}/{first_lsn:020d}-{epoch}{SEGMENT_SUFFIX}"


def list_segments(location: StateLocation) -> list[SegmentInfo]:
    """The shard's segments in log order; ``last_lsn`` is an upper bound until read."""
    found = []
    for name in location.list_files(WAL_FOLDER, SEGMENT_SUFFIX):
        stem = name.rsplit("/", 1)[-1].split("-", 1)[0]
        if stem.isdigit():
            found.append(SegmentInfo(name, int(stem), 0))
    found.sort(key=lambda s: (s.first_lsn, s.name))
    for here, after in zip(found, found[1:]):
        here.last_lsn = max(here.first_lsn, after.first_lsn - 1)
    if found:
        found[-1].last_lsn = 2**63 - 1
    return found


@dataclass
class LogScan:
    records: list[LogRecord]  # LSN > after_lsn, in LSN order, without duplicates
    segments: list[SegmentInfo]
    max_lsn: int = 0
    max_ts: float = 0.0
    torn_records: int = 0
    migrated_records: int = 0


def read_log(
    location: StateLocation,
    after_lsn: int = 0,
    *,
    until_ts: float | None = None,
    skip_corrupt: bool = False,
) -> LogScan:
    """Every record after ``after_lsn`` (and at or before ``until_ts``), read from storage.

    Segments wholly at or before ``after_lsn`` are not read; the others are fetched in
    parallel (an object store answers each GET in tens of ms).
    """
    segments = list_segments(location)
    scan = LogScan([], segments)
    wanted = []
    for i, segment in enumerate(segments):
        if i == len(segments) - 1 or segment.last_lsn > after_lsn:
            wanted.append(segment)
        else:  # wholly covered (by the snapshot): not read
            scan.max_lsn = max(scan.max_lsn, segment.last_lsn)
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(wanted)))) as pool:
        blobs = pool.map(location.read_bytes, [s.name for s in wanted])
        seen: set[int] = set()
        for segment, data in zip(wanted, blobs):
            _scan_segment(scan, segment, data, after_lsn, until_ts, skip_corrupt, seen)
    scan.records.sort(key=lambda r: r.lsn)
    return scan


def _scan_segment(
    scan: LogScan,
    segment: SegmentInfo,
    data: bytes,
    after_lsn: int,
    until_ts: float | None,
    skip_corrupt: bool,
    seen: set[int],
) -> None:
    decoded = decode_segment(data, segment.name, skip_corrupt=skip_corrupt)
    if decoded.torn_at is not None:
        scan.torn_records += 1
        log.warning(
            "torn record at the end of a log segment skipped (a write cut by a crash, "
            "never acknowledged)",
            extra={"segment": segment.name, "offset": decoded.torn_at, "bytes": decoded.torn_bytes},
        )
    last = 0
    for version, payload in decoded.frames:
        record = load_record(payload, version)
        scan.migrated_records += version != STATE_SCHEMA_VERSION
        last = max(last, record.lsn)
        scan.max_ts = max(scan.max_ts, record.ts)
        if record.lsn <= after_lsn or record.lsn in seen:
            continue
        if until_ts is not None and record.ts > until_ts:
            continue
        seen.add(record.lsn)
        scan.records.append(record)
    segment.last_lsn = max(last, segment.first_lsn - 1)
    scan.max_lsn = max(scan.max_lsn, last)


# -- writing --------------------------------------------------------------------------------


class _AppendSink:
    """Local disk: extend one open segment file per group commit (write + fdatasync)."""

    def __init__(
        self, location: StateLocation, epoch: str, fsync: bool, segment_bytes: int
    ) -> None:
        self.location, self.epoch, self.fsync, self.segment_bytes = (
            location,
            epoch,
            fsync,
            segment_bytes,
        )
        self._file: LocalAppendFile | None = None
        self.current: str | None = None

    def write(self, first_lsn: int, frames: bytes) -> str:
        if self._file is not None and self._file.size >= self.segment_bytes:
            self.roll()
        head = b""
        if self._file is None:
            self.current = segment_name(first_lsn, self.epoch)
            self._file = LocalAppendFile(self.location.path(self.current), fsync=self.fsync)
            head = SEGMENT_MAGIC
        try:
            self._file.append(head + frames)
        except BaseException:
            self.roll()  # whatever part landed stays a torn tail; never write after it
            raise
        return self.current  # type: ignore[return-value]

    def roll(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.current = None, None


class _ObjectSink:
    """Object stores: each group commit is one new object (one atomic PUT)."""

    current: str | None = None  # nothing stays open

    def __init__(self, location: StateLocation, epoch: str) -> None:
        self.location, self.epoch = location, epoch

    def write(self, first_lsn: int, frames: bytes) -> str:
        name = segment_name(first_lsn, self.epoch)
        self.location.write_atomic(name, SEGMENT_MAGIC + frames)
        return name

    def roll(self) -> None:
        pass


_Pending = tuple[LogRecord, bytes, "asyncio.Future[LogRecord]"]


class SessionLog:
    """The writer of one shard's log (see the module docstring)."""

    def __init__(
        self,
        location: StateLocation,
        *,
        mode: SinkMode = "auto",
        fsync: bool = True,
        segment_bytes: int = 64 << 20,
        max_batch_records: int = 4096,
        group_commit_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode == "auto":
            mode = "append" if location.is_local else "object"
        if mode == "append" and not location.is_local:
            raise CheckpointError(
                f"log mode='append' needs local disk, not {location.display}; use mode='object'"
            )
        self.location = location
        self.mode = mode
        self.epoch = secrets.token_hex(4)
        self._sink = (
            _AppendSink(location, self.epoch, fsync, segment_bytes)
            if mode == "append"
            else _ObjectSink(location, self.epoch)
        )
        self.max_batch_records = max_batch_records
        self.group_commit_s = group_commit_s
        self._clock = clock
        self._next_lsn = 1
        self._durable_lsn = 0
        self._last_ts = 0.0
        self.segments: list[SegmentInfo] = []
        self._on_commit: Callable[[list[LogRecord]], None] = lambda records: None
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task | None = None
        self._io_lock = asyncio.Lock()
        self.failed: BaseException | None = None
        self.batches = 0

    def start(
        self,
        next_lsn: int,
        last_ts: float,
        segments: list[SegmentInfo],
        on_commit: Callable[[list[LogRecord]], None],
    ) -> None:
        """Continue after what recovery found: LSNs from ``next_lsn``, times from ``last_ts``."""
        self._next_lsn = next_lsn
        self._durable_lsn = next_lsn - 1
        self._last_ts = last_ts
        self.segments = list(segments)
        self._on_commit = on_commit

    @property
    def durable_lsn(self) -> int:
        """Every record up to here is on storage and applied."""
        return self._durable_lsn

    @property
    def last_ts(self) -> float:
        return self._last_ts

    def submit(self, session_id: str, tenant: str, op: Op) -> asyncio.Future[LogRecord]:
        """Queue one record (its LSN is taken now); the future resolves once it is durable."""
        if self.failed is not None:
            raise EngineDeadError(
                f"the session log of {self.location.display} stopped after a write error "
                f"({self.failed!r}); the shard reloads from storage, retry shortly"
            )
        self._last_ts = max(self._last_ts, self._clock())
        record = LogRecord(
            lsn=self._next_lsn, ts=self._last_ts, session_id=session_id, tenant=tenant, op=op
        )
        self._next_lsn += 1
        future: asyncio.Future[LogRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((record, encode_record(record), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return future

    async def append(self, session_id: str, tenant: str, op: Op) -> LogRecord:
        return await self.submit(session_id, tenant, op)

    async def _flush_loop(self) -> None:
        while self._pending:
            if self.group_commit_s > 0 and len(self._pending) < self.max_batch_records:
                await asyncio.sleep(self.group_commit_s)
            batch = self._pending[: self.max_batch_records]
            del self._pending[: len(batch)]
            first, last = batch[0][0].lsn, batch[-1][0].lsn
            try:
                async with self._io_lock:
                    name = await asyncio.to_thread(
                        self._sink.write, first, b"".join(f for _, f, _ in batch)
                    )
                self._note_segment(name, first, last)
                self._durable_lsn = last
                self.batches += 1
                self._on_commit([r for r, _, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                self._fail(exc, batch)
                return
            for record, _, future in batch:
                if not future.done():
                    future.set_result(record)

    def _note_segment(self, name: str, first: int, last: int) -> None:
        if self.segments and self.segments[-1].name == name:
            self.segments[-1].last_lsn = last
        else:
            self.segments.append(SegmentInfo(name, first, last))

    def _fail(self, exc: BaseException, batch: list[_Pending]) -> None:
        self.failed = exc
        log.error("session log write failed; the shard must reload", extra={"error": repr(exc)})
        waiting, self._pending = batch + self._pending, []
        error = EngineDeadError(
            f"the session log of {self.location.display} could not write ({exc!r}); the turn may "
            f"or may not be stored: retry with the same request_id"
        )
        for _, _, future in waiting:
            if not future.done():
                future.set_exception(error)

    async def drain(self) -> None:
        """Wait until everything submitted so far is durable (or failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def roll(self) -> None:
        """Close the open segment: the next batch starts a new one."""
        async with self._io_lock:
            await asyncio.to_thread(self._sink.roll)

    async def truncate(self, covered_lsn: int) -> list[str]:
        """Remove the closed segments whose every record is at or before ``covered_lsn``."""
        doomed = [
            s for s in self.segments if s.last_lsn <= covered_lsn and s.name != self._sink.current
        ]
        for segment in doomed:
            await asyncio.to_thread(self.location.delete, segment.name)
        names = {s.name for s in doomed}
        self.segments = [s for s in self.segments if s.name not in names]
        return sorted(names)

    async def close(self) -> None:
        await self.drain()
        await self.roll()

    def abandon(self) -> None:
        """Let go of a failed log's open file without writing anything more."""
        try:
            self._sink.roll()
        except OSError:
            pass


__all__ = [
    "SessionLog",
    "SegmentInfo",
    "LogScan",
    "DecodedSegment",
    "read_log",
    "list_segments",
    "decode_segment",
    "encode_frame",
    "encode_record",
    "segment_name",
    "SEGMENT_MAGIC",
    "FRAME_HEADER",
]
