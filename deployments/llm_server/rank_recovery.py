"""A model replica that loses a rank rebuilds its rank group itself, at once.

A component the ``LLMServer`` holds, which owns the replica's rank group. Without it a dead
rank is noticed by Serve's health check only after several failed periods, and every request
in between fails with no word on ``/health``.
Here (actors/tp/supervision.py) the replica learns of the death the moment it happens, and:

1. posts the failure on the health board (``GET /health`` answers 503 naming the rank, with
   ``Retry-After`` = the rest of the expected rebuild time: the group's last load time);
2. answers new requests at once with a 503 that says the same, in our words;
3. ends the rest of the old group, starts a new one in the same placement group bundles and
   waits until it has loaded (``serving.rank_start_timeout_s``), then serves again and clears
   the board. A rebuild that fails makes ``check_health`` raise: Serve replaces the replica.

Recovery therefore takes one group load, less than a whole replica's replacement (health
check periods + placement group + replica start + the same load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from actors.tp.rank_group import RankGroup
from actors.tp.supervision import RankSupervisor, clear_failure, post_failure
from cluster.config import ModelConfig
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger

log = get_logger("deployments.llm_server.rank_recovery")


def _serve_ids() -> tuple[str, str, str]:
    """(app, deployment, replica id) of the current Serve replica ("" outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment, ctx.replica_id.unique_id
    except Exception:
        return "", "", ""


class RankRecovery:
    """Holds a replica's rank group, watches it, and rebuilds it when a rank dies (see the
    module docstring). ``group`` is the group that serves now.

    ``config``: the model's configuration now (live updates change it); ``on_stop`` and
    ``on_start`` are called before the old group is ended and after the new one serves (the
    replica's monitor reads the group)."""

    def __init__(
        self,
        group: RankGroup,
        group_options: dict[str, Any],
        load_s: float,
        *,
        name: str,
        start_timeout_s: float,
        config: Callable[[], ModelConfig],
        on_stop: Callable[[], None],
        on_start: Callable[[], None],
    ) -> None:
        self.group = group
        self._group_options = group_options  # how ``RankGroup.start`` made the group
        self._load_s = load_s
        self._name = name
        self._start_timeout_s = start_timeout_s
        self._config = config
        self._on_stop = on_stop
        self._on_start = on_start
        self._generation = 1
        self.failure: dict[str, Any] | None = None  # set while the group is rebuilt
        self.rebuild_failed: str | None = None
        self.stopped: str | None = None  # why the replica serves no more (it stopped)
        self._supervisor = RankSupervisor(self._on_rank_failure)
        self._supervisor.watch(group.actors)

    def unavailable(self) -> EngineDeadError | None:
        """The error for a request while the ranks are rebuilt or after the replica stopped
        (None: the replica serves)."""
        if self.stopped:
            return EngineDeadError(self.stopped)
        if self.rebuild_failed:
            return EngineDeadError(self.rebuild_failed)
        if self.failure is None:
            return None
        left = max(1.0, self.failure["since"] + self.failure["expected_s"] - time.monotonic())
        return EngineDeadError(self.failure["message"], retry_after=left)

    async def _on_rank_failure(self, rank: int, reason: str) -> None:
        if self.failure is not None:
            return
        expected = self._load_s + 1.0
        message = (
            f"model {self._name}: tensor-parallel rank {rank} of a replica stopped ({reason}); "
            f"the replica is restarting its ranks, expected back in about {expected:.0f}s"
        )
        self.failure = {"message": message, "since": time.monotonic(), "expected_s": expected}
        app, deployment, replica = _serve_ids()
        if app:
            post_failure(app, deployment, replica, message, expected)
        await self._rebuild(rank)

    async def _rebuild(self, rank: int) -> None:
        started = time.monotonic()
        self._on_stop()
        self.group.kill()
        self._generation += 1
        options = dict(self._group_options)
        options["name_prefix"] = f"{options['name_prefix']}-g{self._generation}"
        try:
            group = RankGroup.start(self._config(), **options)
            await group.wait_loaded(self._start_timeout_s)
        except Exception as exc:
            self.rebuild_failed = (
                f"model {self._name}: a replica could not restart its ranks after rank {rank} "
                f"stopped ({exc}); Serve replaces the replica"
            )
            log.error("rank group rebuild failed", extra={"model": self._name, "error": str(exc)[:300]})
            return
        self.group = group
        self._load_s = time.monotonic() - started
        self._on_start()
        self._supervisor.watch(group.actors)
        self.failure = None
        app, deployment, replica = _serve_ids()
        if app:
            clear_failure(app, deployment, replica)
        log.info("rank group rebuilt", extra={"model": self._name, "seconds": round(self._load_s, 2)})

    def check(self) -> bool:
        """For Serve's health check: raise when a rebuild failed; True while one runs (the
        replica heals itself and must not be replaced meanwhile)."""
        if self.rebuild_failed:
            raise EngineDeadError(self.rebuild_failed)
        return self.failure is not None

    def stop(self, why: str) -> None:
        """The replica stops: requests get ``why``; the ranks are ended, unwatched."""
        self.stopped = why
        self._supervisor.stop()
        self.group.kill()


__all__ = ["RankRecovery"]
