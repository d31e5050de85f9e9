"""The garbage collection pass of a session shard: expire, archive, compact, prune.

One pass, in this order (each step leaves the shard consistent if the process dies after it):

1. sessions idle longer than ``limits.ttl_s`` are written to an archive file
   (``archive/<ms>-<id>.parquet``, the snapshot row format), then deleted through the log;
   a session changed while its archive was written stays (its archived copy is harmless);
2. a snapshot, which removes the log segments it covers and all but the newest snapshots;
3. archive files older than ``limits.archive_retention_s`` are removed;
4. temporary files left by whole-object writes that a crash cut short are removed.

The report names everything removed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from actors.sessions.snapshot import prune_archives, row_of, write_archive
from cluster.logging_setup import get_logger

log = get_logger("actors.sessions.cleanup")

STALE_TMP_S = 300.0  # a temporary file this old is left from a crashed write


class CollectableShard(Protocol):
    """What a garbage collection pass needs of a session shard (``SessionShard`` has it)."""

    shard: int
    location: Any
    limits: Any

    async def idle_sessions(self, now: float) -> list[Any]: ...

    async def delete_unchanged(self, seen: dict[str, int], reason: str) -> list[str]: ...

    async def snapshot(self) -> dict[str, Any]: ...


async def collect_garbage(shard: CollectableShard, now: float) -> dict[str, Any]:
    """Run one pass over ``shard`` as of time ``now``; returns what it removed."""
    expired = await shard.idle_sessions(now)
    # Live objects: what they are now is what gets archived, and what must still hold when
    # they are deleted (a turn appended meanwhile keeps the session).
    seen = {s.session_id: s.last_lsn for s in expired}
    idle = {s.session_id: (s.tenant, round(now - s.updated_at, 3)) for s in expired}
    archive, deleted, touched = None, [], 0
    if expired:
        rows = [row_of(s) for s in expired]
        archive = await asyncio.to_thread(
            write_archive, shard.location, rows, now=now, reason="ttl"
        )
        deleted = await shard.delete_unchanged(seen, reason="ttl")
        touched = len(expired) - len(deleted)
    snap = await shard.snapshot()
    retention = shard.limits.archive_retention_s
    archives = []
    if retention is not None:
        archives = await asyncio.to_thread(prune_archives, shard.location, now - retention)
    temporaries = await asyncio.to_thread(shard.location.remove_stale_temporaries, STALE_TMP_S)
    report = {
        "expired_sessions": [
            {"session_id": sid, "tenant": idle[sid][0], "idle_s": idle[sid][1]} for sid in deleted
        ],
        "archive": archive,
        "kept_because_touched": touched,
        "snapshot": snap["snapshot"],
        "segments_removed": snap["segments_removed"],
        "snapshots_removed": snap["snapshots_removed"],
        "archives_removed": archives,
        "temporary_files_removed": temporaries,
    }
    log.info(
        "session gc pass",
        extra={"shard": shard.shard, "expired": len(deleted), "archive": archive or ""},
    )
    return report


__all__ = ["collect_garbage", "CollectableShard", "STALE_TMP_S"]
