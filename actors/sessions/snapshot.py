"""Parquet snapshots of a shard, archives of expired sessions, and recovery.

A snapshot ``snapshots/<covered lsn, 20 digits>.parquet`` holds every session of the shard as
of log position ``covered lsn``: one row per session, a few columns to filter on and the whole
``ModelState`` as JSON in ``state`` (with its ``schema_version``, so old rows are migrated on
load). The file's key-value metadata carries the covered LSN and time, the shard and the
format version. It is written whole (see ``StateLocation.write_atomic``); once it is on
storage, the log segments it covers can go.

Recovery (``load_shard``) = the latest snapshot + replay of every later log record through
``apply_record``, which skips what the snapshot already holds: replay is idempotent.
Archives (``archive/<ms>-<token>.parquet``) use the same row format.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from actors.sessions.log import SegmentInfo, read_log
from actors.sessions.storage import StateLocation, sha256_hex
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger
from cluster.state import STATE_SCHEMA_VERSION, ModelState, apply_record, load_state

log = get_logger("actors.sessions.snapshot")

SNAPSHOT_FOLDER = "snapshots"
ARCHIVE_FOLDER = "archive"
PARQUET_SUFFIX = ".parquet"
TABLE_FORMAT = "1"
META_PREFIX = "m_ai."

STATE_TABLE_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("tenant", pa.string()),
        ("user", pa.string()),
        ("created_at", pa.float64()),
        ("updated_at", pa.float64()),
        ("turn_count", pa.int32()),
        ("message_count", pa.int32()),
        ("last_lsn", pa.int64()),
        ("schema_version", pa.int16()),
        ("state", pa.string()),
    ]
)

Row = tuple  # the columns of STATE_TABLE_SCHEMA, in order


def row_of(state: ModelState) -> Row:
    """The table row of ``state`` (its JSON included: the costly part, worth caching)."""
    return (
        state.session_id,
        state.tenant,
        state.user,
        state.created_at,
        state.updated_at,
        state.turn_count,
        len(state.conversation_context.messages),
        state.last_lsn,
        state.schema_version,
        state.model_dump_json(exclude_none=True),
    )


def encode_state_table(rows: list[Row], metadata: dict[str, str]) -> bytes:
    """Rows as Parquet bytes (zstd), ``metadata`` stored under the ``m_ai.`` prefix."""
    columns = list(zip(*rows)) if rows else [[] for _ in STATE_TABLE_SCHEMA]
    meta = {f"{META_PREFIX}{k}": str(v) for k, v in metadata.items()}
    meta[f"{META_PREFIX}table_format"] = TABLE_FORMAT
    schema = STATE_TABLE_SCHEMA.with_metadata(meta)
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass
class StateTable:
    metadata: dict[str, str]
    states: list[ModelState]
    migrated: int = 0


def decode_state_table(data: bytes, name: str) -> StateTable:
    """The sessions of a snapshot, archive or backup file, upgraded to the current schema."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CheckpointError(
            f"{name} is not a readable Parquet state file ({exc}); restore it from a backup"
        ) from None
    raw = table.schema.metadata or {}
    meta = {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.startswith(META_PREFIX.encode())
    }
    missing = {"state", "schema_version"} - set(table.column_names)
    if missing:
        raise CheckpointError(
            f"{name} lacks the column(s) {sorted(missing)}; it is not an M-AI state file"
        )
    out = StateTable(meta, [])
    for text, version in zip(
        table.column("state").to_pylist(), table.column("schema_version").to_pylist()
    ):
        out.states.append(load_state(text, version))
        out.migrated += version != STATE_SCHEMA_VERSION
    return out


# -- snapshots ------------------------------------------------------------------------------


@dataclass
class SnapshotInfo:
    name: str
    covered_lsn: int
    covered_ts: float
    sessions: int
    bytes: int
    sha256: str


def snapshot_name(covered_lsn: int) -> str:
    return f"{SNAPSHOT_FOLDER}/{covered_lsn:020d}{PARQUET_SUFFIX}"


def list_snapshots(location: StateLocation) -> list[tuple[int, str]]:
    """``(covered lsn, name)`` of every snapshot, oldest first."""
    found = []
    for name in location.list_files(SNAPSHOT_FOLDER, PARQUET_SUFFIX):
        stem = name.rsplit("/", 1)[-1].removesuffix(PARQUET_SUFFIX)
        if stem.isdigit():
            found.append((int(stem), name))
    return sorted(found)


def write_snapshot(
    location: StateLocation, rows: list[Row], *, covered_lsn: int, covered_ts: float, shard: str
) -> SnapshotInfo:
    data = encode_state_table(
        rows,
        {
            "kind": "snapshot",
            "schema_version": STATE_SCHEMA_VERSION,
            "covered_lsn": covered_lsn,
            "covered_ts": repr(covered_ts),
            "shard": shard,
            "created_at": repr(time.time()),
            "sessions": len(rows),
        },
    )
    name = snapshot_name(covered_lsn)
    location.write_atomic(name, data)
    return SnapshotInfo(name, covered_lsn, covered_ts, len(rows), len(data), sha256_hex(data))


def prune_snapshots(location: StateLocation, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest snapshots."""
    doomed = [name for _, name in list_snapshots(location)[:-keep]] if keep > 0 else []
    for name in doomed:
        location.delete(name)
    return doomed


# -- archives -------------------------------------------------------------------------------


def write_archive(location: StateLocation, rows: list[Row], *, now: float, reason: str) -> str:
    """Expired sessions, kept out of the live state (same row format as snapshots)."""
    name = f"{ARCHIVE_FOLDER}/{int(now * 1000):015d}-{secrets.token_hex(3)}{PARQUET_SUFFIX}"
    data = encode_state_table(
        rows,
        {
            "kind": "archive",
            "schema_version": STATE_SCHEMA_VERSION,
            "reason": reason,
            "archived_at": repr(now),
        },
    )
    location.write_atomic(name, data)
    return name


def list_archives(location: StateLocation) -> list[str]:
    return location.list_files(ARCHIVE_FOLDER, PARQUET_SUFFIX)


def archive_time(name: str) -> float:
    stem = name.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(stem) / 1000 if stem.isdigit() else 0.0


def prune_archives(location: StateLocation, older_than: float) -> list[str]:
    doomed = [n for n in list_archives(location) if archive_time(n) < older_than]
    for name in doomed:
        location.delete(name)
    return doomed


# -- recovery -------------------------------------------------------------------------------


@dataclass
class LoadedShard:
    """What recovery found: the sessions, and where the log goes on from."""

    sessions: dict[str, ModelState]
    snapshot: str | None
    covered_lsn: int
    max_lsn: int
    last_ts: float
    segments: list[SegmentInfo]
    replayed: int = 0
    duplicates: int = 0
    missing: int = 0
    torn_records: int = 0
    migrated: int = 0
    seconds: float = 0.0
    cut_ts: float | None = None
    view_lsn: int = 0  # the last log position the sessions reflect
    outcomes: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict:
        return {
            "sessions": len(self.sessions),
            "snapshot": self.snapshot,
            "covered_lsn": self.covered_lsn,
            "max_lsn": self.max_lsn,
            "replayed_records": self.replayed,
            "duplicate_records": self.duplicates,
            "records_of_missing_sessions": self.missing,
            "torn_records": self.torn_records,
            "migrated": self.migrated,
            "seconds": round(self.seconds, 4),
        }


def load_shard(
    location: StateLocation, *, until_ts: float | None = None, skip_corrupt: bool = False
) -> LoadedShard:
    """The shard's sessions from its latest snapshot plus the log after it.

    ``until_ts`` replays only records at or before that time (a point-in-time view, for
    backups); the snapshot itself is never cut, so the view is at least as new as it.
    """
    started = time.perf_counter()
    snapshots = list_snapshots(location)
    sessions: dict[str, ModelState] = {}
    covered_lsn, covered_ts, snapshot, migrated = 0, 0.0, None, 0
    if snapshots:
        covered_lsn, snapshot = snapshots[-1]
        table = decode_state_table(location.read_bytes(snapshot), f"{location.display}/{snapshot}")
        covered_ts = float(table.metadata.get("covered_ts", 0.0))
        migrated = table.migrated
        sessions = {s.session_id: s for s in table.states}
    scan = read_log(location, covered_lsn, until_ts=until_ts, skip_corrupt=skip_corrupt)
    if list_snapshots(location)[-1:] != snapshots[-1:]:
        # A live writer snapshotted meanwhile and may have removed segments we needed.
        raise FileNotFoundError(
            f"{location.display}: a new snapshot appeared while reading; read again"
        )
    outcomes = {"applied": 0, "duplicate": 0, "missing": 0}
    for record in scan.records:
        outcomes[apply_record(sessions, record)] += 1
    loaded = LoadedShard(
        sessions=sessions,
        snapshot=snapshot,
        covered_lsn=covered_lsn,
        max_lsn=max(covered_lsn, scan.max_lsn),
        last_ts=max(covered_ts, scan.max_ts),
        segments=scan.segments,
        replayed=outcomes["applied"],
        duplicates=outcomes["duplicate"],
        missing=outcomes["missing"],
        torn_records=scan.torn_records,
        migrated=migrated + scan.migrated_records,
        cut_ts=None if until_ts is None else max(until_ts, covered_ts),
        view_lsn=max([covered_lsn] + [r.lsn for r in scan.records[-1:]]),
        outcomes=outcomes,
    )
    loaded.seconds = time.perf_counter() - started
    return loaded


__all__ = [
    "STATE_TABLE_SCHEMA",
    "SnapshotInfo",
    "LoadedShard",
    "StateTable",
    "row_of",
    "encode_state_table",
    "decode_state_table",
    "snapshot_name",
    "list_snapshots",
    "write_snapshot",
    "prune_snapshots",
    "write_archive",
    "list_archives",
    "prune_archives",
    "load_shard",
]
