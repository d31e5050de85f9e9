"""Where memory lives between restarts: Parquet files through ``pyarrow.fs``.

One folder per user, independent of the number of memory shards (any shard can load any
user): ``tenants/<tenant>/<user>/`` holds the files below. Names are percent-encoded; a name
whose encoding would pass ``MAX_NAME_BYTES`` (file systems refuse names above 255 bytes) is
stored as ``=`` + its SHA-256 instead (fixed length; ``=`` never starts an encoded name), and
the folder then holds ``owner.json`` with the real tenant and user. So no id a client sends
ever becomes a name the file system refuses.

- ``facts.parquet``: every long-term record (history included), its stored (quantized)
  embedding as bytes, and in the file metadata the format version, the embedder name,
  dimension and dtype, the next index key, the decision counters and the digest of the keys
  that the saved graph holds;
- ``index.usearch``: the HNSW graph (only for users above the brute-force threshold); on load
  it is used when its keys match the records, otherwise the graph is rebuilt;
- ``episodes.parquet``: one row per session (window, pending turns, summaries as JSON), one
  for the user summary, and one per memory unit (every absorbed message, actors/memory/units.py:
  JSON plus its stored vector; the file metadata names the embedder, dimension and dtype of
  those vectors). The units' lexical index is rebuilt from them at load;
- ``journal/``: the API writes acknowledged since the files were last written
  (actors/memory/journal.py); the facts metadata names the last entry they hold.

Each file is written whole (``actors.sessions.storage``: temporary file + fsync + rename on local
disk, one PUT on object stores), so a crash leaves the previous or the new version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.memory.episodic import SessionEpisodes, UserEpisodes
from actors.memory.learning.summarizer import SummarySentence
from actors.memory.longterm import UserLongTerm
from actors.memory.records import MemoryRecord
from actors.sessions.storage import StateLocation, open_location
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.persistence")

FORMAT_VERSION = 1
FACTS_FILE = "facts.parquet"
EPISODES_FILE = "episodes.parquet"
GRAPH_FILE = "index.usearch"
OWNER_FILE = "owner.json"
MAX_NAME_BYTES = 200  # an encoded name longer than this is stored as its hash
HASHED_PREFIX = "="


def folder_name(name: str) -> str:
    """The folder name of a tenant or user id: percent-encoded, or ``=<sha256>`` when the
    encoding would be longer than ``MAX_NAME_BYTES``."""
    encoded = quote(name, safe="")
    if len(encoded) <= MAX_NAME_BYTES:
        return encoded
    return HASHED_PREFIX + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()

FACT_SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("tenant", pa.string()), ("user", pa.string()), ("text", pa.string()),
        ("kind", pa.string()), ("slot", pa.string()), ("value", pa.string()),
        ("importance", pa.float64()), ("created_at", pa.float64()), ("updated_at", pa.float64()),
        ("last_accessed_at", pa.float64()), ("access_count", pa.int64()),
        ("confirmations", pa.int64()), ("source_turns", pa.list_(pa.string())),
        ("origin", pa.string()), ("status", pa.string()), ("superseded_by", pa.string()),
        ("superseded_at", pa.float64()), ("supersedes", pa.list_(pa.string())),
        ("key", pa.int64()), ("embedding", pa.binary()),
    ]
)
_RECORD_FIELDS = [f.name for f in FACT_SCHEMA if f.name != "embedding"]


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def warm_up_parquet_writer() -> None:
    """Write one small file to memory. A process's first Parquet write pages in ~5 MB of
    Arrow and Parquet code; a shard that does it when it starts reaches its steady footprint
    then, not at its first flush, whose time depends on traffic (a session deleted within
    ``persist_interval_s`` is never written)."""
    to_parquet_bytes(episodes_table(UserEpisodes()))


@dataclass(frozen=True)
class FactsSnapshot:
    """One user's long-term memory cut on the event loop, written later off it."""

    records: list[MemoryRecord]
    rows: dict[int, int]  # index key -> row of ``matrix``
    matrix: np.ndarray  # stored (quantized) vectors
    dimension: int
    dtype: str
    next_key: int
    counters: dict[str, int]
    graph: bytes | None
    graph_digest: str | None
    graph_kept: bool = False  # the stored graph already holds these keys: not written again
    journal_through: int = 0  # the last journal entry (actors/memory/journal.py) this cut holds

    @classmethod
    def of(cls, longterm: UserLongTerm, with_graph: bool, stored_digest: str | None = None) -> FactsSnapshot:
        """``stored_digest``: the keys of the graph already in storage. When they are still the
        index's keys (only access counts or statuses changed), the graph is not serialized again:
        at 100k memories that holds the event loop for ~0.2 s."""
        rows, matrix = longterm.index.snapshot()
        graph, digest, kept = None, None, False
        if with_graph:
            digest = longterm.index.keys_digest()
            kept = stored_digest is not None and digest == stored_digest
            graph = None if kept else longterm.index.graph_bytes()
            if graph is None and not kept:
                digest = None
        return cls(
            records=list(longterm.records.values()),
            rows=rows,
            matrix=matrix,
            dimension=longterm.index.dimension,
            dtype=longterm.index.dtype,
            next_key=longterm.next_key,
            counters=dict(longterm.counters),
            graph=graph,
            graph_digest=digest,
            graph_kept=kept,
        )


def facts_table(snapshot: FactsSnapshot, embedder: str) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in _RECORD_FIELDS}
    embeddings: list[bytes | None] = []
    for record in snapshot.records:
        for name in _RECORD_FIELDS:
            value = getattr(record, name)
            columns[name].append(list(value) if isinstance(value, list) else value)
        row = snapshot.rows.get(record.key) if record.active else None
        embeddings.append(None if row is None else snapshot.matrix[row].tobytes())
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "embedder": embedder,
        "dimension": str(snapshot.dimension),
        "dtype": snapshot.dtype,
        "next_key": str(snapshot.next_key),
        "counters": json.dumps(snapshot.counters),
        "graph_digest": snapshot.graph_digest or "",
        "journal_through": str(snapshot.journal_through),
    }
    arrays = [
        pa.array(columns[f.name], type=f.type) if f.name != "embedding"
        else pa.array(embeddings, type=pa.binary())
        for f in FACT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=FACT_SCHEMA.with_metadata(metadata))


@dataclass(frozen=True)
class LoadedFacts:
    records: list[MemoryRecord]
    stored: dict[str, np.ndarray]  # record id -> stored vector (active records)
    metadata: dict[str, str]


def read_facts(table: pa.Table) -> LoadedFacts:
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"memory file format_version={version} is newer than this M-AI ({FORMAT_VERSION}); upgrade M-AI"
        )
    dtype = {"i8": np.int8, "f16": np.float16, "f32": np.float32}[metadata.get("dtype", "f32")]
    rows = table.to_pylist()
    records, stored = [], {}
    for row in rows:
        embedding = row.pop("embedding", None)
        row["slot"] = row["slot"] or None
        row["source_turns"] = list(row["source_turns"] or [])
        row["supersedes"] = list(row["supersedes"] or [])
        record = MemoryRecord(**row)
        records.append(record)
        if embedding is not None and record.active:
            stored[record.id] = np.frombuffer(embedding, dtype=dtype)
    return LoadedFacts(records, stored, metadata)


EPISODES_SCHEMA = pa.schema(
    [("kind", pa.string()), ("session_id", pa.string()), ("data", pa.string()), ("vector", pa.binary())]
)


def episodes_table(episodes: UserEpisodes, units: list[dict[str, Any]] | None = None,
                   space: dict[str, str] | None = None) -> pa.Table:
    """Sessions, the user summary and (``units``: ``UserUnits.rows``) the memory units with
    their stored vectors; ``space``: the embedder name, dimension and dtype of those vectors."""
    rows = [{"kind": "session", "session_id": s.session_id, "data": json.dumps(s.to_json()), "vector": None}
            for s in episodes.sessions.values()]
    user = {
        "user_summary": [[s.text, s.turn_id, list(s.fact_ids)] for s in episodes.user_summary],
        "archived": [[s.text, s.turn_id, list(s.fact_ids)] for s in episodes.archived],
        "dirty": episodes.user_summary_dirty,
    }
    rows.append({"kind": "user", "session_id": "", "data": json.dumps(user), "vector": None})
    rows += units or []
    metadata = {"format_version": str(FORMAT_VERSION), **(space or {})}
    return pa.Table.from_pylist(rows, schema=EPISODES_SCHEMA.with_metadata(metadata))


def episodes_table_from_rows(rows: list[dict[str, Any]], space: dict[str, str]) -> pa.Table:
    metadata = {"format_version": str(FORMAT_VERSION), **space}
    return pa.Table.from_pylist(rows, schema=EPISODES_SCHEMA.with_metadata(metadata))


def read_episodes(table: pa.Table) -> UserEpisodes:
    return read_episodes_and_units(table)[0]


def read_episodes_and_units(table: pa.Table) -> tuple[UserEpisodes, list[dict[str, Any]], dict[str, str]]:
    """The episodes, the unit rows (for ``UserUnits.load_rows``) and the table's metadata
    (files written before units existed have neither units nor metadata)."""
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    episodes = UserEpisodes()
    units = []
    for row in table.to_pylist():
        if row["kind"] == "unit":
            units.append(row)
            continue
        data = json.loads(row["data"])
        if row["kind"] == "session":
            session = SessionEpisodes.from_json(data)
            episodes.sessions[session.session_id] = session
        else:
            episodes.user_summary = [SummarySentence(t, int(n), tuple(f)) for t, n, f in data["user_summary"]]
            episodes.archived = [SummarySentence(t, int(n), tuple(f)) for t, n, f in data["archived"]]
            episodes.user_summary_dirty = bool(data.get("dirty", False))
    return episodes, units, metadata


@dataclass(frozen=True)
class UserFiles:
    facts: bytes | None
    episodes: bytes | None
    graph: bytes | None


class MemoryStorage:
    """The memory folder of one root URI (a directory, ``s3://...``, ``gs://...``)."""

    def __init__(self, uri: str, location: StateLocation | None = None) -> None:
        self.location = location or open_location(uri)

    @staticmethod
    def folder(tenant: str, user: str) -> str:
        return f"tenants/{folder_name(tenant)}/{folder_name(user)}"

    @staticmethod
    def hashed(tenant: str, user: str) -> bool:
        return HASHED_PREFIX in (folder_name(tenant)[:1], folder_name(user)[:1])

    def users(self) -> list[tuple[str, str]]:
        """Every (tenant, user) with stored memory."""
        found = []
        tenants = self.location.child("tenants")
        for tenant in tenants.list_folders():
            for user in tenants.child(tenant).list_folders():
                if HASHED_PREFIX in (tenant[:1], user[:1]):
                    owner = f"tenants/{tenant}/{user}/{OWNER_FILE}"
                    if self.location.exists(owner):
                        names = json.loads(self.location.read_bytes(owner))
                        found.append((names["tenant"], names["user"]))
                    continue
                found.append((unquote(tenant), unquote(user)))
        return found

    def read(self, tenant: str, user: str) -> UserFiles:
        folder = self.folder(tenant, user)

        def get(name: str) -> bytes | None:
            path = f"{folder}/{name}"
            return self.location.read_bytes(path) if self.location.exists(path) else None

        return UserFiles(get(FACTS_FILE), get(EPISODES_FILE), get(GRAPH_FILE))

    def write(self, tenant: str, user: str, facts: pa.Table, episodes: pa.Table,
              graph: bytes | None, keep_graph: bool = False) -> int:
        """Write one user's files (graph first: the facts name the graph they match;
        ``keep_graph``: the stored graph still matches, leave it)."""
        folder = self.folder(tenant, user)
        self.location.ensure_folder(folder)
        written = 0
        if self.hashed(tenant, user) and not self.location.exists(f"{folder}/{OWNER_FILE}"):
            owner = json.dumps({"tenant": tenant, "user": user}).encode()
            self.location.write_atomic(f"{folder}/{OWNER_FILE}", owner)
        if graph is not None:
            self.location.write_atomic(f"{folder}/{GRAPH_FILE}", graph)
            written += len(graph)
        elif not keep_graph:
            self.location.delete(f"{folder}/{GRAPH_FILE}")
        for name, table in ((FACTS_FILE, facts), (EPISODES_FILE, episodes)):
            data = to_parquet_bytes(table)
            self.location.write_atomic(f"{folder}/{name}", data)
            written += len(data)
        return written

    def delete(self, tenant: str, user: str) -> None:
        """Remove the user's files and folder: ``users()`` no longer lists it."""
        folder = self.folder(tenant, user)
        for name in (FACTS_FILE, EPISODES_FILE, GRAPH_FILE, OWNER_FILE):
            self.location.delete(f"{folder}/{name}")
        self.location.delete_folder(folder)


def parse_facts(data: bytes) -> LoadedFacts:
    return read_facts(_from_parquet(data))


def facts_metadata(data: bytes) -> dict[str, str]:
    """The facts file's metadata alone (its footer), without reading the rows."""
    metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


def parse_episodes(data: bytes) -> UserEpisodes:
    return read_episodes(_from_parquet(data))


def parse_episodes_and_units(data: bytes) -> tuple[UserEpisodes, list[dict[str, Any]], dict[str, str]]:
    return read_episodes_and_units(_from_parquet(data))


__all__ = [
    "MemoryStorage",
    "folder_name",
    "MAX_NAME_BYTES",
    "UserFiles",
    "LoadedFacts",
    "facts_table",
    "FactsSnapshot",
    "episodes_table",
    "episodes_table_from_rows",
    "parse_facts",
    "facts_metadata",
    "parse_episodes",
    "parse_episodes_and_units",
    "FORMAT_VERSION",
    "to_parquet_bytes",
    "warm_up_parquet_writer",
]
