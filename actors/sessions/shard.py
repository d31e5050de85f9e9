"""``SessionShard``: the durable sessions of one store shard, as a plain asyncio class.

The store actor wraps it (``ray.remote``; a Ray async actor, since its methods are ``async``).
It keeps the same calls and return shapes as the ingress's session client (``deployments.ingress.stores.sessions``) (create,
get, context, append, list_sessions, delete) and adds durability, settings, cleanup and
recovery. The API is asyncio for one event loop; it is not thread-safe.

How a change is made: the call is checked against the *reserved* view of the shard (what is
committed plus what is queued: next turn id, tenant, liveness), the view is updated at once,
and the record goes to the write-ahead log; there is no ``await`` in between, so concurrent
calls cannot take the same turn id. The log applies the record to the sessions when its batch
is durable, then the call returns (the acknowledgement). Readers see only durable state.

On the first call (and after a log write error) the shard rebuilds itself from storage: the
latest snapshot plus the log after it. A shard id maps to the folder ``shard-<NNN>`` under
the root URI, so a restarted actor finds its data wherever it runs.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from actors.sessions.cleanup import collect_garbage
from actors.sessions.log import SessionLog, SinkMode
from actors.sessions.requests import (
    check_session_id,
    merged_parameters,
    new_session_id,
    new_state,
    new_turn,
    new_update,
)
from actors.sessions.snapshot import (
    Row,
    load_shard,
    prune_snapshots,
    row_of,
    write_snapshot,
)
from actors.sessions.storage import open_location
from cluster.errors import InvalidRequestError, NotFoundError
from cluster.logging_setup import get_logger
from cluster.state import (
    RECENT_REQUEST_IDS,
    CreateOp,
    DeleteOp,
    LogRecord,
    ModelParameters,
    ModelState,
    ResourceUsage,
    SessionLimits,
    TurnMetrics,
    apply_record,
)

log = get_logger("actors.sessions.shard")

GC_FREEZE_EVERY = 2048  # committed records between two gc.freeze() when gc_freeze is on


def shard_folder(shard: int) -> str:
    return f"shard-{shard:03d}"


@dataclass
class _Reserved:
    """A session as the queued changes will leave it."""

    tenant: str
    next_turn: int
    parameters: ModelParameters
    request_ids: list[str] = field(default_factory=list)
    pending: int = 0  # its records queued in the log, not yet committed


class SessionShard:
    """One shard of durable sessions (see the module docstring)."""

    def __init__(
        self,
        root: str,
        shard: int = 0,
        *,
        limits: SessionLimits | dict[str, Any] | None = None,
        max_sessions: int | None = None,
        filesystem: pafs.FileSystem | None = None,
        log_mode: SinkMode = "auto",
        fsync: bool = True,
        group_commit_s: float = 0.0,
        snapshot_every_records: int = 50_000,
        snapshot_interval_s: float | None = 600.0,
        snapshots_kept: int = 2,
        skip_corrupt: bool = False,
        gc_freeze: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        limits = SessionLimits.model_validate(limits or {})
        if max_sessions is not None:  # SessionStore's keyword, kept for a drop-in switch
            limits = limits.model_copy(update={"max_sessions": max_sessions})
        self.limits = limits
        self.shard = shard
        self.location = open_location(root, filesystem).child(shard_folder(shard))
        self._log_options = dict(mode=log_mode, fsync=fsync, group_commit_s=group_commit_s)
        self.snapshot_every_records = snapshot_every_records
        self.snapshot_interval_s = snapshot_interval_s
        self.snapshots_kept = max(1, snapshots_kept)
        self.skip_corrupt = skip_corrupt
        self.gc_freeze = gc_freeze
        self._since_freeze = 0
        self._clock = clock
        self._sessions: dict[str, ModelState] = {}
        self._reserved: dict[str, _Reserved] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._rows: dict[str, Row] = {}
        self._log: SessionLog | None = None
        self._open_lock = asyncio.Lock()  # binds to the running loop on first use
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_task: asyncio.Task | None = None
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._durable_ts = 0.0
        self.last_recovery: dict[str, Any] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> dict[str, Any]:
        """Load the shard from storage unless it is loaded; returns the recovery report."""
        await self._ready()
        return dict(self.last_recovery or {})

    async def recover(self) -> dict[str, Any]:
        """Drop the in-memory state and rebuild it from snapshot + log."""
        async with self._open_lock:
            await self._recover_locked()
        return dict(self.last_recovery or {})

    async def _ready(self) -> SessionLog:
        if self._log is None or self._log.failed is not None:
            async with self._open_lock:
                if self._log is None or self._log.failed is not None:
                    await self._recover_locked()
        return self._log  # type: ignore[return-value]

    async def _recover_locked(self) -> None:
        if self._log is not None:
            if self._log.failed is None:
                await self._log.close()
            else:
                self._log.abandon()
        self._log = None
        await asyncio.to_thread(self.location.ensure_folder, "wal")
        loaded = await asyncio.to_thread(load_shard, self.location, skip_corrupt=self.skip_corrupt)
        self._sessions = loaded.sessions
        self._rows.clear()
        self._reserved = {
            sid: _Reserved(s.tenant, s.turn_count, s.model_parameters, list(s.request_ids))
            for sid, s in self._sessions.items()
        }
        self._by_tenant = {}
        for sid, state in self._sessions.items():
            self._by_tenant.setdefault(state.tenant, set()).add(sid)
        self._durable_ts = loaded.last_ts
        new_log = SessionLog(self.location, clock=self._clock, **self._log_options)
        new_log.start(loaded.max_lsn + 1, loaded.last_ts, loaded.segments, self._on_commit)
        self._log = new_log
        self._since_snapshot = loaded.replayed
        self.last_recovery = loaded.report()
        self._freeze_long_lived()
        log.info("session shard recovered", extra={"shard": self.shard, **self.last_recovery})

    async def close(self) -> None:
        """Wait for queued records and any snapshot; close the open segment."""
        if self._snapshot_task is not None:
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
        if self._log is not None and self._log.failed is None:
            await self._log.close()

    def _on_commit(self, records: list[LogRecord]) -> None:
        """Called by the log once a batch is durable: apply it (idempotent)."""
        for record in records:
            if apply_record(self._sessions, record) == "applied":
                self._rows.pop(record.session_id, None)
            reserved = self._reserved.get(record.session_id)
            if reserved is not None and reserved.pending > 0:
                reserved.pending -= 1
        self._durable_ts = records[-1].ts
        self._since_snapshot += len(records)
        self._since_freeze += len(records)
        if self.gc_freeze and self._since_freeze >= GC_FREEZE_EVERY:
            self._freeze_long_lived()
        due = self._since_snapshot >= self.snapshot_every_records or (
            self.snapshot_interval_s is not None
            and time.monotonic() - self._last_snapshot_at >= self.snapshot_interval_s
        )
        if due and (self._snapshot_task is None or self._snapshot_task.done()):
            self._snapshot_task = asyncio.get_running_loop().create_task(
                self._background_snapshot()
            )

    def _freeze_long_lived(self) -> None:
        """With ``gc_freeze``: collect the young generations, then exclude every surviving
        object from later collections. Full collections otherwise scan the whole state (tens
        of ms for ~100k turns) and stall every queued acknowledgement; sessions hold no
        reference cycles, so refcounting still frees them. Process-wide: only for a process
        that is the store actor."""
        self._since_freeze = 0
        if self.gc_freeze:
            gc.collect(1)
            gc.freeze()

    async def _background_snapshot(self) -> None:
        try:
            await self.snapshot()
        except Exception as exc:  # noqa: BLE001 - the log still holds everything; retry later
            log.error("periodic snapshot failed", extra={"shard": self.shard, "error": repr(exc)})

    # -- sessions ---------------------------------------------------------------------------

    def _find(self, session_id: str, tenant: str) -> tuple[ModelState, _Reserved]:
        """The committed session and its reservation; another tenant's reads as missing."""
        reserved = self._reserved.get(session_id)
        state = self._sessions.get(session_id)
        if reserved is None or state is None or reserved.tenant != tenant:
            raise NotFoundError(
                f"session_id={session_id!r} does not exist (or belongs to another tenant)",
                param="session_id",
            )
        return state, reserved

    async def create(
        self,
        tenant: str,
        session_id: str | None = None,
        system_prompt: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        user: str | None = None,
        model_parameters: ModelParameters | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start a session (a new unguessable id unless given); durable when it returns."""
        wal = await self._ready()
        sid = check_session_id(session_id or new_session_id())
        if sid in self._reserved:
            raise InvalidRequestError(
                f"session_id={sid!r} already exists; omit it to get a new id", param="session_id"
            )
        limits = self.limits
        if len(self._reserved) >= limits.max_sessions:
            raise InvalidRequestError(
                f"this store shard holds max_sessions={limits.max_sessions} sessions; delete "
                f"idle sessions or add store shards",
                param="session_id",
            )
        owned = self._by_tenant.get(tenant, set())
        if len(owned) >= limits.max_sessions_per_tenant:
            raise InvalidRequestError(
                f"tenant {tenant!r} has max_sessions_per_tenant={limits.max_sessions_per_tenant} "
                f"sessions on this shard; delete some (DELETE /v1/sessions/{{id}}) first",
                param="tenant",
            )
        state = new_state(
            sid,
            tenant,
            now=self._clock(),
            system_prompt=system_prompt,
            metadata=metadata,
            user=user,
            model_parameters=model_parameters,
        )
        self._reserved[sid] = _Reserved(tenant, 0, state.model_parameters, pending=1)
        self._by_tenant.setdefault(tenant, set()).add(sid)
        await wal.submit(sid, tenant, CreateOp(state=state))
        return state.summary()

    async def get(self, session_id: str, tenant: str) -> dict[str, Any]:
        """The session's summary with its messages."""
        await self._ready()
        return self._find(session_id, tenant)[0].summary(with_messages=True)

    async def state(self, session_id: str, tenant: str) -> ModelState:
        """A copy of the full ``ModelState``."""
        await self._ready()
        return self._find(session_id, tenant)[0].model_copy(deep=True)

    async def context(self, session_id: str, tenant: str) -> list[dict[str, str]]:
        """The system prompt (if any) then every message so far."""
        await self._ready()
        return self._find(session_id, tenant)[0].context_messages()

    async def list_sessions(self, tenant: str) -> list[dict[str, Any]]:
        """Summaries of the tenant's committed sessions, oldest first."""
        await self._ready()
        found = (self._sessions.get(sid) for sid in self._by_tenant.get(tenant, ()))
        states = sorted(
            (s for s in found if s is not None), key=lambda s: (s.created_at, s.session_id)
        )
        return [s.summary() for s in states]

    async def append(
        self,
        session_id: str,
        tenant: str,
        messages: list[dict[str, Any]],
        *,
        request_id: str | None = None,
        usage: ResourceUsage | dict[str, Any] | None = None,
        metrics: TurnMetrics | dict[str, Any] | None = None,
    ) -> int:
        """Add one turn (its messages); returns how many messages the session holds.

        Durable when it returns. A retry carrying the ``request_id`` of a turn already stored
        is not applied again.
        """
        wal = await self._ready()
        state, reserved = self._find(session_id, tenant)
        if request_id is not None and request_id in reserved.request_ids:
            return len(state.conversation_context.messages)
        if reserved.next_turn >= self.limits.max_turns_per_session:
            raise InvalidRequestError(
                f"session {session_id!r} reached max_turns_per_session="
                f"{self.limits.max_turns_per_session}; start a new session",
                param="session_id",
            )
        op = new_turn(
            messages,
            turn_id=reserved.next_turn,
            now=self._clock(),
            limits=self.limits,
            request_id=request_id,
            usage=usage,
            metrics=metrics,
        )
        reserved.next_turn += 1
        reserved.pending += 1
        if request_id is not None:
            reserved.request_ids = (reserved.request_ids + [request_id])[-RECENT_REQUEST_IDS:]
        await wal.submit(session_id, tenant, op)
        return len(state.conversation_context.messages)

    async def update(
        self,
        session_id: str,
        tenant: str,
        *,
        system_prompt: str | None = None,
        model_parameters: ModelParameters | dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        user: str | None = None,
        clear: list[str] | tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Change the session's settings. ``model_parameters`` are merged into the current
        ones (``clear`` may name ``model_parameters``, ``system_prompt`` or ``user`` to reset
        them first). Durable when it returns."""
        wal = await self._ready()
        state, reserved = self._find(session_id, tenant)
        op, reserved.parameters = new_update(
            reserved.parameters,
            system_prompt=system_prompt,
            model_parameters=model_parameters,
            metadata=metadata,
            user=user,
            clear=clear,
        )
        reserved.pending += 1
        await wal.submit(session_id, tenant, op)
        return state.summary()

    async def effective_parameters(
        self,
        session_id: str,
        tenant: str,
        overrides: ModelParameters | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The session's parameters with one request's ``overrides`` on top."""
        await self._ready()
        return merged_parameters(self._find(session_id, tenant)[0].model_parameters, overrides)

    async def delete(self, session_id: str, tenant: str) -> bool:
        """Remove the session (durable when it returns)."""
        wal = await self._ready()
        self._find(session_id, tenant)
        await self._submit_delete(wal, session_id, tenant, "user")
        return True

    def _submit_delete(
        self, wal: SessionLog, session_id: str, tenant: str, reason: str
    ) -> asyncio.Future:
        del self._reserved[session_id]
        self._by_tenant.get(tenant, set()).discard(session_id)
        return wal.submit(session_id, tenant, DeleteOp(reason=reason))

    def __len__(self) -> int:
        return len(self._sessions)

    # -- snapshots and cleanup --------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """Write a snapshot of the durable state, then drop the log segments it covers."""
        wal = await self._ready()
        async with self._snapshot_lock:
            await wal.roll()
            # One synchronous cut: the sessions reflect exactly the records up to durable_lsn.
            covered_lsn, covered_ts = wal.durable_lsn, self._durable_ts
            rows = []
            for sid, state in self._sessions.items():
                row = self._rows.get(sid)
                if row is None:
                    row = self._rows[sid] = row_of(state)
                rows.append(row)
            started = time.perf_counter()
            info = await asyncio.to_thread(
                write_snapshot,
                self.location,
                rows,
                covered_lsn=covered_lsn,
                covered_ts=covered_ts,
                shard=shard_folder(self.shard),
            )
            segments = await wal.truncate(covered_lsn)
            snapshots = await asyncio.to_thread(prune_snapshots, self.location, self.snapshots_kept)
            self._since_snapshot = max(0, wal.durable_lsn - covered_lsn)
            self._last_snapshot_at = time.monotonic()
        report = {
            "snapshot": info.name,
            "covered_lsn": covered_lsn,
            "sessions": info.sessions,
            "bytes": info.bytes,
            "seconds": round(time.perf_counter() - started, 4),
            "segments_removed": segments,
            "snapshots_removed": snapshots,
        }
        log.info(
            "session snapshot written",
            extra={
                "shard": self.shard,
                **{k: v for k, v in report.items() if not isinstance(v, list)},
            },
        )
        return report

    async def idle_sessions(self, now: float) -> list[ModelState]:
        """Committed sessions idle longer than ``limits.ttl_s`` at ``now`` (none without TTL).
        These are the live objects: note their ``last_lsn`` before the next ``await``."""
        await self._ready()
        ttl = self.limits.ttl_s
        if ttl is None:
            return []
        return [
            s
            for s in self._sessions.values()
            if now - s.updated_at > ttl and s.session_id in self._reserved
        ]

    async def delete_unchanged(self, seen: dict[str, int], reason: str) -> list[str]:
        """Delete each session still at the log position ``seen`` gives for it (session id
        -> ``last_lsn`` when it was looked at) with no change queued; returns the ids
        deleted, durable then."""
        wal = await self._ready()
        doomed = [
            (sid, state.tenant)
            for sid, lsn in seen.items()
            if (reserved := self._reserved.get(sid)) is not None
            and reserved.pending == 0
            and (state := self._sessions.get(sid)) is not None
            and state.last_lsn == lsn
        ]
        await asyncio.gather(
            *(self._submit_delete(wal, sid, tenant, reason) for sid, tenant in doomed)
        )
        return [sid for sid, _ in doomed]

    async def gc(self, now: float | None = None) -> dict[str, Any]:
        """One garbage collection pass (``actors.sessions.cleanup``): archive then delete
        idle sessions, snapshot, drop covered segments, old snapshots, expired archives and
        stale temporaries. Returns what was removed."""
        return await collect_garbage(self, self._clock() if now is None else now)

    def stats(self) -> dict[str, Any]:
        wal = self._log
        return {
            "shard": self.shard,
            "sessions": len(self._sessions),
            "durable_lsn": wal.durable_lsn if wal else 0,
            "segments": len(wal.segments) if wal else 0,
            "batches": wal.batches if wal else 0,
            "log_mode": wal.mode if wal else None,
        }


__all__ = ["SessionShard", "new_session_id", "shard_folder"]
