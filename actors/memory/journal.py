"""The journal of acknowledged memory writes: durable before the API answers.

Long-term memory is written whole (``facts.parquet``) a while after a change
(``memory.persist_interval_s``). A write the API confirms (``add_memory``, ``delete_memory``,
``delete_user_memories``) must not wait for that: before it returns, its outcome is written
to the user's journal, one small JSON object per write under
``tenants/<tenant>/<user>/journal/<seq, 20 digits>.json`` (``write_atomic``: temporary file,
fsync, rename on local disk; one PUT on object stores). An entry holds what the write left
behind, not what it was asked: the records it created or changed, whole (with their stored
vectors), or the ids it deleted, so replaying it gives the same ids and never calls the
embedder or the deduplication again.

When the user's files are written, the facts file records the last journal position it
contains (``journal_through`` in its metadata) and the entries up to it are removed. A user
loaded from storage replays the entries after ``journal_through`` in order: an entry whose
files were written but not yet removed is skipped, one whose removal was cut short is removed
by the next write. Replaying is idempotent (records are put by id).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.memory.records import MemoryRecord

JOURNAL_FOLDER = "journal"
SUFFIX = ".json"


@dataclass
class JournalEntry:
    """One acknowledged write: ``op`` is ``put`` (``records`` with their stored vectors),
    ``delete`` (``ids``) or ``delete_all`` (the user's facts and episodes)."""

    seq: int
    op: str
    records: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[str, str] = field(default_factory=dict)  # record id -> base64 of the stored vector
    dtype: str = "f32"
    ids: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> JournalEntry:
        return cls(**json.loads(data))


_DTYPES = {"i8": np.int8, "f16": np.float16, "f32": np.float32}


def put_entry(seq: int, records: list[MemoryRecord], stored: dict[str, np.ndarray], dtype: str) -> JournalEntry:
    """An entry that puts ``records`` (with the stored vectors of the active ones)."""
    return JournalEntry(
        seq,
        "put",
        records=[dataclasses.asdict(r) for r in records],
        vectors={rid: base64.b64encode(np.ascontiguousarray(v).tobytes()).decode() for rid, v in stored.items()},
        dtype=dtype,
    )


def entry_records(entry: JournalEntry) -> tuple[list[MemoryRecord], dict[str, np.ndarray]]:
    dtype = _DTYPES[entry.dtype]
    records = [MemoryRecord(**r) for r in entry.records]
    stored = {rid: np.frombuffer(base64.b64decode(b), dtype=dtype) for rid, b in entry.vectors.items()}
    return records, stored


def entry_name(folder: str, seq: int) -> str:
    return f"{folder}/{JOURNAL_FOLDER}/{seq:020d}{SUFFIX}"


def read_entries(location: Any, folder: str, after: int) -> list[JournalEntry]:
    """The user's journal entries with ``seq > after``, oldest first."""
    names = location.list_files(f"{folder}/{JOURNAL_FOLDER}", SUFFIX)
    entries = []
    for name in names:
        seq = _seq_of(name)
        if seq is not None and seq > after:
            entries.append(JournalEntry.from_bytes(location.read_bytes(name)))
    return sorted(entries, key=lambda e: e.seq)


def last_seq(location: Any, folder: str) -> int:
    seqs = [_seq_of(n) for n in location.list_files(f"{folder}/{JOURNAL_FOLDER}", SUFFIX)]
    return max((s for s in seqs if s is not None), default=0)


def remove_through(location: Any, folder: str, through: int) -> int:
    """Remove the entries with ``seq <= through`` (their writes are in the user's files)."""
    removed = 0
    for name in location.list_files(f"{folder}/{JOURNAL_FOLDER}", SUFFIX):
        seq = _seq_of(name)
        if seq is not None and seq <= through:
            location.delete(name)
            removed += 1
    return removed


def _seq_of(name: str) -> int | None:
    stem = name.rsplit("/", 1)[-1].removesuffix(SUFFIX)
    return int(stem) if stem.isdigit() else None


def replay(memory: Any, entries: list[JournalEntry]) -> int:
    """Apply ``entries`` to a loaded ``UserMemory`` (its long-term store and episodes);
    returns the last position applied (0 when none)."""
    from actors.memory.episodic import UserEpisodes

    longterm = memory.longterm
    through = 0
    for entry in entries:
        if entry.op == "put":
            records, stored = entry_records(entry)
            for record in records:
                longterm.delete(record.id)
                vector = stored.get(record.id) if record.active else None
                if record.active and vector is None:
                    continue  # an active record needs its vector; never written without one
                longterm.insert(record, vector, stored=True)
        elif entry.op == "delete":
            for memory_id in entry.ids:
                longterm.delete(memory_id)
        elif entry.op == "delete_all":
            longterm.delete_all()
            memory.episodes = UserEpisodes()
        through = entry.seq
    if entries:
        longterm.index.ensure_graph()
    return through


__all__ = [
    "JournalEntry",
    "put_entry",
    "entry_records",
    "entry_name",
    "read_entries",
    "last_seq",
    "remove_through",
    "replay",
    "JOURNAL_FOLDER",
]
