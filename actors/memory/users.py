"""The users one memory shard holds: loaded on first use, written back after changes.

``MemoryUsers`` maps (tenant, user) to ``UserMemory``. Without storage a user starts empty;
with storage (``memory.storage_uri``) the first call for a user reads its files in a worker
thread (concurrent callers wait for the same load), and changed users are written
``persist_interval_s`` after a change (users whose access counts alone changed, at most once a
minute), on ``flush()`` and at close. Snapshots of a user are cut on the event loop and
serialized and written off it (actors/memory/persistence.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from actors.memory.episodic import UserEpisodes
from actors.memory.journal import (
    JournalEntry,
    entry_name,
    last_seq,
    put_entry,
    read_entries,
    remove_through,
    replay,
)
from actors.memory.learning.absorb import UserMemory
from actors.memory.longterm import UserLongTerm
from actors.memory.persistence import (
    FactsSnapshot,
    MemoryStorage,
    UserFiles,
    episodes_table,
    episodes_table_from_rows,
    facts_metadata,
    facts_table,
    parse_episodes_and_units,
    parse_facts,
    warm_up_parquet_writer,
)
from actors.memory.records import MemoryRecord
from actors.memory.units import UserUnits, unit_rows
from cluster.config.memory import MemoryConfig
from cluster.plugins import PluginRegistry
from engine.embedding.embedders import Embedder

TOUCHED_WRITE_EVERY_S = 60.0
BACKENDS_GROUP = "m_ai.memory_backends"
BACKEND_INTERFACE = ("users", "read", "write", "delete")


def open_storage(config: MemoryConfig, registry: PluginRegistry | None = None) -> Any:
    """The configured backend plugin, else the Parquet files under ``storage_uri``, else None."""
    if config.backend is not None:
        return (registry or PluginRegistry()).load(
            BACKENDS_GROUP, config.backend.name, config.backend.options,
            field="memory.backend", required=BACKEND_INTERFACE,
        )
    return MemoryStorage(config.storage_uri) if config.storage_uri else None


class MemoryUsers:
    """(tenant, user) -> ``UserMemory``, with loading and writing (see the module docstring)."""

    def __init__(
        self,
        config: MemoryConfig,
        embedder: Callable[[], Embedder],
        clock: Callable[[], float],
        *,
        read_only: bool = False,
        on_loaded: Callable[[UserMemory], None] = lambda memory: None,
        registry: PluginRegistry | None = None,
    ) -> None:
        self.config = config
        self._embedder = embedder
        self.clock = clock
        self.read_only = read_only  # operators' tools: never write, never re-embed
        self.on_loaded = on_loaded
        self.storage = open_storage(config, registry)
        if isinstance(self.storage, MemoryStorage) and not read_only:
            warm_up_parquet_writer()
        self.users: dict[tuple[str, str], UserMemory] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[UserMemory]] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._journal_seq: dict[tuple[str, str], int] = {}  # last journal position per user

    def loaded(self) -> list[UserMemory]:
        return list(self.users.values())

    def find(self, key: tuple[str, str]) -> UserMemory | None:
        """A loaded user, without loading it."""
        return self.users.get(key)

    async def get(self, tenant: str, user: str) -> UserMemory:
        key = (tenant, user)
        found = self.users.get(key)
        if found is not None:
            return found
        if self.storage is None:
            found = self.users[key] = self.new(tenant, user)
            return found
        loading = self._loading.get(key)
        if loading is not None:
            return await loading
        future: asyncio.Future[UserMemory] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            files = await asyncio.to_thread(self.storage.read, tenant, user)
            found, seq = await asyncio.to_thread(self._build_and_replay, tenant, user, files)
            self._journal_seq[key] = seq
            self.users[key] = found
            future.set_result(found)
            self.on_loaded(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._loading[key]

    async def read(self, tenant: str, user: str) -> UserMemory:
        """A user for a request that only reads it (list, get, search): ``get``, except that a
        user with nothing in memory or storage is not kept. Reads of arbitrary user ids would
        otherwise leave one empty user each, for the life of the shard."""
        key = (tenant, user)
        found = self.users.get(key)
        if found is not None:
            return found
        loading = self._loading.get(key)
        if loading is not None:
            return await loading
        if self.storage is None:
            return self.new(tenant, user)
        files = await asyncio.to_thread(self.storage.read, tenant, user)
        memory, seq = await asyncio.to_thread(self._build_and_replay, tenant, user, files)
        found = self.users.get(key)  # loaded meanwhile by a write: that copy is the one kept
        if found is not None:
            return found
        if not _holds_anything(memory):
            return memory
        self._journal_seq[key] = seq
        self.users[key] = memory
        self.on_loaded(memory)
        return memory

    async def remove(self, tenant: str, user: str) -> bool:
        """Forget a user whole, in memory and in storage (deleting what is not stored is a
        no-op). True when the user was loaded."""
        key = (tenant, user)
        loading = self._loading.get(key)
        if loading is not None:
            await asyncio.wait([loading])
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:  # a flush in progress must not write the user back
            found = self.users.pop(key, None) is not None
            self._journal_seq.pop(key, None)
            if self.storage is not None and not self.read_only:
                await asyncio.to_thread(self.storage.delete, tenant, user)
        return found

    def new(self, tenant: str, user: str) -> UserMemory:
        dimension = self._embedder().dimension
        longterm = UserLongTerm(tenant, user, dimension, self.config)
        return UserMemory(tenant, user, longterm, UserEpisodes(), units=UserUnits(dimension, self.config.index))

    def _space(self) -> dict[str, str]:
        """The vector space of stored unit vectors: they are reused only in the same one."""
        embedder = self._embedder()
        return {"embedder": embedder.name, "dimension": str(embedder.dimension),
                "dtype": self.config.index.embedding_dtype}

    def _build_and_replay(self, tenant: str, user: str, files: UserFiles) -> tuple[UserMemory, int]:
        """``_build``, then the journal entries its files do not hold yet (a worker thread);
        returns the user and its last journal position."""
        memory = self._build(tenant, user, files)
        if not isinstance(self.storage, MemoryStorage):
            return memory, 0
        through = 0
        if files.facts is not None:
            through = int(facts_metadata(files.facts).get("journal_through", "0") or "0")
        folder, location = self.storage.folder(tenant, user), self.storage.location
        entries = read_entries(location, folder, through)
        if entries:
            replay(memory, entries)
            memory.dirty = not self.read_only  # written whole with the next flush
        return memory, max(through, last_seq(location, folder))

    def _build(self, tenant: str, user: str, files: UserFiles) -> UserMemory:
        """A user from its files (runs in a worker thread: the object is not shared yet)."""
        memory = self.new(tenant, user)
        embedder = self._embedder()
        if files.facts is not None:
            loaded = parse_facts(files.facts)
            same_space = (
                loaded.metadata.get("embedder") == embedder.name
                and int(loaded.metadata.get("dimension", "0")) == embedder.dimension
                and loaded.metadata.get("dtype") == self.config.index.embedding_dtype
            )
            stored = loaded.stored if same_space else {}
            graph = files.graph if same_space and loaded.metadata.get("graph_digest") else None
            if self.read_only and not same_space:  # records only: nothing to search
                for record in loaded.records:
                    memory.longterm.insert(record, None)
            elif memory.longterm.load(loaded.records, stored, graph, embedder.embed):
                memory.graph_digest_written = loaded.metadata.get("graph_digest") or None
            counters = json.loads(loaded.metadata.get("counters", "{}") or "{}")
            memory.longterm.counters.update({k: int(v) for k, v in counters.items()})
            memory.longterm.next_key = max(memory.longterm.next_key, int(loaded.metadata.get("next_key", "1")))
            if not same_space:
                memory.dirty = True  # written again with the current embedder's vectors
        if files.episodes is not None:
            memory.episodes, rows, space = parse_episodes_and_units(files.episodes)
            same_space = all(space.get(k) == v for k, v in self._space().items())
            assert memory.units is not None
            memory.units.load_rows(rows, same_space and not self.read_only)
            if rows and not same_space and not self.read_only:
                memory.dirty = True  # re-embedded by the worker, written again
        memory.last_written = self.clock()
        return memory

    async def load_all(self) -> int:
        """Load every stored user; returns how many are loaded."""
        if self.storage is not None:
            for tenant, user in await asyncio.to_thread(self.storage.users):
                await self.get(tenant, user)
        return len(self.users)

    # -- writing ----------------------------------------------------------------------------

    async def journal(
        self, memory: UserMemory, op: str, records: list[MemoryRecord] = (), ids: list[str] = ()  # type: ignore[assignment]
    ) -> None:
        """Make an API write durable before it is acknowledged: one journal entry holding its
        outcome (``op``: put / delete / delete_all; actors/memory/journal.py). A storage
        backend plugin has no journal: the changed users are written whole instead."""
        if self.storage is None or self.read_only:
            return
        if not isinstance(self.storage, MemoryStorage):
            await self.flush(include_touched=False)
            return
        key = (memory.tenant, memory.user)
        seq = self._journal_seq.get(key, 0) + 1
        self._journal_seq[key] = seq
        if op == "put":
            index = memory.longterm.index
            stored = {r.id: index.stored(r.key) for r in records if r.active and r.key in index}
            entry = put_entry(seq, list(records), stored, self.config.index.embedding_dtype)
        else:
            entry = JournalEntry(seq, op, ids=list(ids))
        name = entry_name(self.storage.folder(memory.tenant, memory.user), seq)
        await asyncio.to_thread(self.storage.location.write_atomic, name, entry.to_bytes())

    def schedule_flush(self) -> None:
        if self.storage is None or self.read_only:
            return
        if self._flush_task is not None and not self._flush_task.done():
            return
        self._flush_task = asyncio.get_running_loop().create_task(self._delayed_flush())

    async def _delayed_flush(self) -> None:
        await asyncio.sleep(self.config.persist_interval_s)
        await self.flush(include_touched=False)

    async def flush(self, include_touched: bool = True) -> dict[str, Any]:
        """Write every changed user now; returns users and bytes written."""
        if self.storage is None or self.read_only:
            return {"users": 0, "bytes": 0}
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            now = self.clock()
            due = [m for m in self.users.values() if m.dirty or (m.touched and (
                include_touched or now - m.last_written >= TOUCHED_WRITE_EVERY_S))]
            written = 0
            for memory in due:
                memory.dirty = memory.touched = False
                snapshot = FactsSnapshot.of(
                    memory.longterm, self.config.index.persist_index,
                    memory.graph_digest_written if isinstance(self.storage, MemoryStorage) else None,
                )
                units = memory.units.snapshot() if memory.units is not None else None
                through = self._journal_seq.get((memory.tenant, memory.user), 0)
                snapshot = dataclasses.replace(snapshot, journal_through=through)
                episodes = episodes_table(memory.episodes)
                written += await asyncio.to_thread(self._write, memory, snapshot, episodes, units)
                memory.last_written = now
            return {"users": len(due), "bytes": written}

    def _write(self, memory: UserMemory, snapshot: FactsSnapshot, episodes: Any, units: Any = None) -> int:
        assert self.storage is not None
        facts = facts_table(snapshot, self._embedder().name)
        if units is not None:  # the unit rows are serialized here, off the event loop
            rows = episodes.to_pylist() + unit_rows(units)
            episodes = episodes_table_from_rows(rows, self._space())
        if snapshot.graph_kept:  # only MemoryStorage is asked to keep its graph
            written = self.storage.write(memory.tenant, memory.user, facts, episodes, None, keep_graph=True)
        else:
            written = self.storage.write(memory.tenant, memory.user, facts, episodes, snapshot.graph)
        memory.graph_digest_written = snapshot.graph_digest
        if isinstance(self.storage, MemoryStorage) and snapshot.journal_through:
            folder = self.storage.folder(memory.tenant, memory.user)
            remove_through(self.storage.location, folder, snapshot.journal_through)
        return written

    def close(self) -> None:
        if self._flush_task is not None and not self._flush_task.done():
            self._flush_task.cancel()


def _holds_anything(memory: UserMemory) -> bool:
    episodes = memory.episodes
    return bool(
        memory.longterm.records or episodes.sessions or episodes.user_summary or episodes.archived
        or (memory.units is not None and len(memory.units))
    )


__all__ = ["MemoryUsers", "TOUCHED_WRITE_EVERY_S"]
