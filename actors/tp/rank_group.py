"""The rank actors of one model replica, created in the replica's placement group.

The replica (a Serve deployment) reserves a STRICT_PACK placement group: bundle 0 for itself,
bundle ``1 + rank`` for each tensor-parallel rank. ``RankGroup.start`` puts one
``RankActor`` in each rank's bundle, so all ranks share a node and reach each other on
127.0.0.1 (the rendezvous port is picked free here). The actors are owned by the replica:
when Serve replaces the replica they die with it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors.tp.rank import RankActor
from cluster.config import ModelConfig
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger
from cluster.net import free_port

log = get_logger("actors.tp.rank_group")

MASTER_ADDR = "127.0.0.1"



class RankGroup:
    """Handles to the ``tp_size`` rank actors of one replica; rank 0 serves requests."""

    def __init__(self, actors: list[Any], names: list[str]) -> None:
        self.actors = actors
        self.names = names

    @property
    def rank0(self) -> Any:
        return self.actors[0]

    @classmethod
    def start(
        cls,
        model_config: ModelConfig,
        *,
        name_prefix: str,
        engine_cls: str | type | None = None,
        engine_options: dict[str, Any] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        niceness: int | None = None,
    ) -> RankGroup:
        """Create one actor per rank in the current placement group (bundles 1..tp_size)."""
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        tp = model_config.tp_size
        pg = get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) < tp + 1:
            raise EngineDeadError(
                f"the replica's placement group has {len(pg.bundle_specs)} bundles, but tp_size={tp} "
                f"needs {tp + 1} (one for the replica, one per rank); deploy with build_app's options"
            )
        port = free_port()
        remote_cls = ray.remote(RankActor)
        actors, names = [], []
        for rank in range(tp):
            name = f"{name_prefix}-rank{rank}"
            options: dict[str, Any] = {
                "num_cpus": num_cpus,
                "num_gpus": num_gpus,
                "name": name,
                "max_restarts": 0,
            }
            if niceness is not None:
                # Ray's core worker sets its process's niceness from this at start (15 unless
                # told otherwise); the replica's other env_vars are inherited.
                options["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(niceness)}}
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1
                )
            actors.append(
                remote_cls.options(**options).remote(
                    model_config, rank, tp, MASTER_ADDR, port, engine_cls, engine_options
                )
            )
            names.append(name)
        log.info(
            "rank actors created",
            extra={
                "model": model_config.served_name,
                "tp_size": tp,
                "in_placement_group": pg is not None,
            },
        )
        return cls(actors, names)

    async def wait_loaded(self, timeout_s: float) -> list[dict[str, Any]]:
        """Wait until every rank has loaded (they join one process group, so all or none)."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(a.load.remote() for a in self.actors)), timeout_s
            )
        except asyncio.TimeoutError:
            self.kill()
            raise EngineDeadError(
                f"the {len(self.actors)} ranks did not load within {timeout_s:.0f}s; "
                f"raise serving.rank_start_timeout_s or check the rank logs"
            ) from None
        except BaseException:
            self.kill()
            raise

    async def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise ``EngineDeadError`` naming the first rank that is dead or unhealthy."""
        import ray

        calls = [self.rank0.check_health.remote()] + [a.ping.remote() for a in self.actors[1:]]
        for rank, call in enumerate(calls):
            try:
                await asyncio.wait_for(call, timeout_s)
            except asyncio.TimeoutError:
                raise EngineDeadError(
                    f"rank {rank} did not answer within {timeout_s:.0f}s"
                ) from None
            except ray.exceptions.RayActorError as exc:
                raise EngineDeadError(
                    f"rank {rank} ({self.names[rank]}) is dead: {exc}"
                ) from None
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, EngineDeadError) else None
                raise cause or EngineDeadError(f"rank {rank} is unhealthy: {exc}") from None

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass


__all__ = ["RankGroup", "free_port", "MASTER_ADDR"]
