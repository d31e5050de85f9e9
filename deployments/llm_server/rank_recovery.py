"""A model replica that loses a rank rebuilds its rank group itself, at once.

Mixed into ``LLMServer`` (which provides ``ranks``, ``serving``, ``name``, ``config`` and
``_start_monitor``). Without it a dead rank is noticed by Serve's health check only after
several failed periods, and every request in between fails with no word on ``/health``.
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
from typing import Any

from actors.tp.rank_group import RankGroup
from actors.tp.supervision import RankSupervisor, clear_failure, post_failure
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
    """Supervision of the rank group and its rebuild (see the module docstring)."""

    ranks: RankGroup
    name: str
    serving: Any
    config: Any

    def _supervise(self, group_options: dict[str, Any], load_s: float) -> None:
        """Start watching the ranks; ``group_options``: how ``RankGroup.start`` made them."""
        self._group_options = group_options
        self._load_s = load_s
        self._generation = 1
        self.failure: dict[str, Any] | None = None  # set while the group is rebuilt
        self.rebuild_failed: str | None = None
        self._supervisor = RankSupervisor(self._on_rank_failure)
        self._supervisor.watch(self.ranks.actors)

    def unavailable(self) -> EngineDeadError | None:
        """The error for a request while the ranks are rebuilt or after the replica stopped
        (None: the replica serves)."""
        stopped = getattr(self, "stopped", None)
        if stopped:
            return EngineDeadError(stopped)
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
            f"model {self.name}: tensor-parallel rank {rank} of a replica stopped ({reason}); "
            f"the replica is restarting its ranks, expected back in about {expected:.0f}s"
        )
        self.failure = {"message": message, "since": time.monotonic(), "expected_s": expected}
        app, deployment, replica = _serve_ids()
        if app:
            post_failure(app, deployment, replica, message, expected)
        await self._rebuild(rank)

    async def _rebuild(self, rank: int) -> None:
        started = time.monotonic()
        self._stop_monitor()  # type: ignore[attr-defined]
        self.ranks.kill()
        self._generation += 1
        options = dict(self._group_options)
        options["name_prefix"] = f"{options['name_prefix']}-g{self._generation}"
        try:
            group = RankGroup.start(self.config, **options)
            await group.wait_loaded(self.serving.rank_start_timeout_s)
        except Exception as exc:
            self.rebuild_failed = (
                f"model {self.name}: a replica could not restart its ranks after rank {rank} "
                f"stopped ({exc}); Serve replaces the replica"
            )
            log.error("rank group rebuild failed", extra={"model": self.name, "error": str(exc)[:300]})
            return
        self.ranks = group
        self._load_s = time.monotonic() - started
        self._start_monitor()  # type: ignore[attr-defined]
        self._supervisor.watch(group.actors)
        self.failure = None
        app, deployment, replica = _serve_ids()
        if app:
            clear_failure(app, deployment, replica)
        log.info("rank group rebuilt", extra={"model": self.name, "seconds": round(self._load_s, 2)})

    def check_recovery(self) -> bool:
        """For Serve's health check: raise when a rebuild failed; True while one runs (the
        replica heals itself and must not be replaced meanwhile)."""
        if self.rebuild_failed:
            raise EngineDeadError(self.rebuild_failed)
        return self.failure is not None

    def stop_supervision(self) -> None:
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            supervisor.stop()


__all__ = ["RankRecovery"]
