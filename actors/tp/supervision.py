"""Supervision of a replica's rank group, and the board where replicas post their failures.

A model replica owns its tensor-parallel ranks (``actors.tp.rank_group``). Serve's own health
check notices a dead rank only after several failed periods (three by default, every
``serving.health_check_period_s``): tens of seconds during which ``/health`` says ok and every
request fails. ``RankSupervisor`` notices at once instead: each rank holds one
never-answering ``watch()`` call of its replica; the call fails the moment the rank's process
dies (Ray reports the actor's death to its callers) or its engine / follower thread stops
(``RankActor.watch`` checks every ``WATCH_INTERVAL_S``). The replica then rebuilds its rank
group in place (deployments/llm_server/deployment.py).

While a replica rebuilds, it posts why and for how long on a health board in Ray's key-value
store (``post_failure`` / ``clear_failure``); ``GET /health`` of every ingress reads the board
(``failures``) beside Serve's status, so it tells the truth within its cache period, and
``Retry-After`` says when the rebuild is expected to finish.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger

log = get_logger("actors.tp.supervision")

WATCH_INTERVAL_S = 0.5
BOARD_PREFIX = "m-ai/health/"


def why_rank_stopped(exc: BaseException) -> str:
    """A rank's end in our words (never Ray's class names)."""
    import ray.exceptions

    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, EngineDeadError):
        return exc.message
    if isinstance(exc, ray.exceptions.RayActorError):
        return "its process exited"
    return "it stopped answering"


class RankSupervisor:
    """Calls ``on_failure(rank, reason)`` once when any rank of the watched group stops."""

    def __init__(self, on_failure: Callable[[int, str], Awaitable[None]]) -> None:
        self.on_failure = on_failure
        self._task: asyncio.Task[None] | None = None

    def watch(self, actors: list[Any]) -> None:
        self.stop()
        self._task = asyncio.get_running_loop().create_task(self._run(list(actors)))

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    async def _run(self, actors: list[Any]) -> None:
        calls = {asyncio.ensure_future(self._watch_one(a)): rank for rank, a in enumerate(actors)}
        try:
            done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for call in calls:
                call.cancel()
            raise
        first = next(iter(done))
        rank = calls[first]
        for call in calls:
            if call is not first:
                call.cancel()
        exc = first.exception()
        reason = why_rank_stopped(exc) if exc is not None else "it stopped watching"
        log.error("tensor-parallel rank stopped", extra={"rank": rank, "reason": reason})
        await self.on_failure(rank, reason)

    @staticmethod
    async def _watch_one(actor: Any) -> None:
        await actor.watch.remote(WATCH_INTERVAL_S)


# -- the health board -------------------------------------------------------------------------


def _key(app: str, deployment: str, replica: str) -> str:
    return f"{BOARD_PREFIX}{app}/{deployment}/{replica}"


def post_failure(app: str, deployment: str, replica: str, reason: str, expected_s: float) -> None:
    """Post that ``replica`` cannot serve, why, and about how long it takes to recover."""
    from ray.experimental import internal_kv

    record = {"reason": reason, "since": time.time(), "expected_s": expected_s}
    try:
        internal_kv._internal_kv_put(_key(app, deployment, replica), json.dumps(record), overwrite=True)
    except Exception:  # the board is an aid; the replica still fails fast and recovers
        log.warning("health board not updated", exc_info=True)


def clear_failure(app: str, deployment: str, replica: str) -> None:
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_del(_key(app, deployment, replica))
    except Exception:
        log.warning("health board not cleared", exc_info=True)


def failures(app: str) -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> the failures its replicas posted (oldest first)."""
    from ray.experimental import internal_kv

    found: dict[str, list[dict[str, Any]]] = {}
    prefix = f"{BOARD_PREFIX}{app}/"
    for raw_key in internal_kv._internal_kv_list(prefix):
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        value = internal_kv._internal_kv_get(key)
        if not value:
            continue
        deployment, _, replica = key[len(prefix):].partition("/")
        found.setdefault(deployment, []).append({**json.loads(value), "replica": replica})
    for posted in found.values():
        posted.sort(key=lambda r: r["since"])
    return found


def posted_failures(apps: set[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(app, deployment) -> the failures its replicas posted, for each of ``apps``; an app
    whose board cannot be read is left out (the board is an aid: Serve's status still answers)."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for app in apps:
        try:
            for deployment, posted in failures(app).items():
                found[(app, deployment)] = posted
        except Exception:
            log.warning("health board unreadable", exc_info=True)
    return found


def remaining_s(record: dict[str, Any], now: float | None = None) -> float:
    """Seconds until the posted recovery is expected (at least 1)."""
    now = time.time() if now is None else now
    return max(1.0, record["since"] + record["expected_s"] - now)


__all__ = [
    "RankSupervisor",
    "why_rank_stopped",
    "post_failure",
    "clear_failure",
    "failures",
    "posted_failures",
    "remaining_s",
    "WATCH_INTERVAL_S",
]
