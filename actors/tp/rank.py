"""One tensor-parallel rank of a model replica, as a plain class that Ray makes an actor.

Rank 0 runs the engine core over its ``TPWorker`` (``LLMEngine.from_worker``) and serves the
replica's requests: one stream per request (``generate``), never one call per step, over its
local request socket (``stream_channel.py``) or as a Ray streaming call. Ranks
above 0 load their weights rank, then follow rank 0's per-step broadcasts in a thread
(``TPWorker.serve_forever``) while the actor keeps answering pings.

The engine class is a parameter: one whose ``uses_rank_workers`` is true (the real
``LLMEngine``) runs over TP workers (``from_worker``); any other ``AsyncEngineClient`` (the
``FakeEngine``) is made by ``from_config`` in rank 0 alone, the other ranks idle, so tests exercise the same actors and placement group.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from cluster.config import ModelConfig
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger
from engine.stream_batching import StreamPacing, coalesce
from engine.types import EngineStats, RequestOutput, SamplingParams

log = get_logger("actors.tp.rank")

REAL_ENGINE = "engine.engine:LLMEngine"


def ray_gpu_ids() -> list[int | str]:
    """The GPUs Ray gave this process (empty outside Ray or without ``num_gpus``)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return list(ray.get_gpu_ids())
    except Exception:  # not inside a Ray worker
        return []


def _ray_sockets_dir() -> str | None:
    """Ray's sockets directory of this node's session (None outside Ray)."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_sockets_dir_path()
    except Exception:  # not inside a Ray worker, or a Ray without it
        return None


def resolve_engine_cls(engine_cls: str | type | None) -> type:
    """An engine class from itself or from a ``"module:Class"`` path (None: the real engine)."""
    if engine_cls is None:
        engine_cls = REAL_ENGINE
    if isinstance(engine_cls, str):
        module, _, name = engine_cls.partition(":")
        if not name:
            raise ValueError(f"engine_cls={engine_cls!r} is not a 'module:Class' path")
        return getattr(importlib.import_module(module), name)
    return engine_cls


class RankActor:
    """A TP rank (see the module docstring); every method is safe to call on any rank."""

    def __init__(
        self,
        model_config: ModelConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        engine_cls: str | type | None = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = model_config
        self.rank = rank
        self.world_size = world_size
        self.master_addr = master_addr
        self.master_port = master_port
        self.engine_cls = resolve_engine_cls(engine_cls)
        self.engine_options = dict(engine_options or {})
        self.engine: Any = None
        self.worker: Any = None
        self._follower: threading.Thread | None = None
        self._follower_error: str | None = None
        self._active_streams = 0
        self._loaded = False
        self._stream_server: Any = None  # rank 0's request channel, once the replica asks

    # -- start --------------------------------------------------------------------------------

    @property
    def uses_tp_workers(self) -> bool:
        return bool(self.engine_cls.uses_rank_workers)

    async def load(self) -> dict[str, Any]:
        """Load this rank (blocks until every rank joined the group); returns where it runs."""
        cfg = self.config
        if self.uses_tp_workers:
            from engine.rank.worker import TPWorker

            self.worker = TPWorker(
                cfg, self.rank, self.world_size, self.master_addr, self.master_port,
                gpu_ids=ray_gpu_ids(),
            )
            await asyncio.to_thread(self.worker.load)
            if self.rank == 0:
                self.engine = await asyncio.to_thread(
                    self.engine_cls.from_worker, self.worker, cfg, **self.engine_options
                )
            else:
                self._follower = threading.Thread(
                    target=self._follow, name=f"m-ai-tp-rank{self.rank}", daemon=True
                )
                self._follower.start()
        elif self.rank == 0:
            self.engine = self.engine_cls.from_config(cfg, **self.engine_options)
        self._loaded = True
        log.info(
            "rank loaded",
            extra={"rank": self.rank, "world_size": self.world_size, "model": cfg.served_name},
        )
        return {"rank": self.rank, "pid": os.getpid()}

    def _follow(self) -> None:
        try:
            self.worker.serve_forever()
        except BaseException as exc:  # the thread's end is reported by ping()
            self._follower_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "tensor-parallel follower stopped",
                extra={"rank": self.rank, "error": self._follower_error},
            )
        else:
            self._follower_error = "stopped following rank 0"

    # -- rank 0: requests ---------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        pacing: StreamPacing | None = None,
        share_prompt_of: str | None = None,
        resumed: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas, coalesced per ``pacing`` (None: one output at the end).
        ``share_prompt_of``: the first of ``n`` samples of the same prompt (its KV is shared).
        ``resumed``: the prompt's tail that is the request's own output from a replica that
        died (``EngineCore.add_request``).

        Cancelling this call (``ray.cancel`` of the caller's stream) closes the engine's
        stream, which cancels the request: the one cancellation path.
        """
        engine = self._engine()
        interval = None if pacing is None else (lambda: pacing.interval_s(self._active_streams))
        self._active_streams += 1
        extra = {"share_prompt_of": share_prompt_of} if share_prompt_of else {}
        if resumed:
            extra["resumed"] = resumed
        try:
            async for out in coalesce(engine.generate(prompt, params, request_id, **extra), interval):
                yield out
        finally:
            self._active_streams -= 1

    async def open_stream_channel(self) -> dict[str, Any]:
        """Rank 0 also serves ``generate`` on a Unix socket (``actors/tp/stream_channel.py``):
        its path and this rank's node, for the replica to connect to (once per rank group)."""
        import atexit

        from actors.tp.stream_channel import RankStreamServer

        self._engine()
        if self._stream_server is None:
            self._stream_server = await RankStreamServer(self.generate, _ray_sockets_dir()).start()
            atexit.register(self._stream_server.close)
        return {"path": self._stream_server.path, "node_id": self.describe().get("node_id")}

    def stats(self) -> EngineStats:
        return self._engine().stats()

    def update_config(self, model_config: ModelConfig) -> None:
        """Take new live fields (sampling defaults) without reloading."""
        self.config = model_config
        update = getattr(self._engine(), "update_config", None)
        if update is not None:
            update(model_config)

    # -- every rank: health -------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` when this rank cannot serve (its engine or its follower died)."""
        if self.rank == 0:
            self._engine().check_health()
        self.ping()

    async def watch(self, interval_s: float = 0.5) -> None:
        """Never answers while this rank can serve; raises ``EngineDeadError`` as soon as it
        cannot (its engine or follower stopped). The replica keeps one call pending per rank
        (actors/tp/supervision.py): if the process dies, Ray fails the call at once."""
        while True:
            await asyncio.sleep(interval_s)
            if self._loaded:
                self.check_health()

    def ping(self) -> int:
        if self._follower is not None and not self._follower.is_alive():
            raise EngineDeadError(
                f"tensor-parallel rank {self.rank} stopped: {self._follower_error or 'unknown reason'}"
            )
        return self.rank

    def describe(self) -> dict[str, Any]:
        """Where this rank runs: process, node and placement group (when inside Ray)."""
        info: dict[str, Any] = {
            "rank": self.rank,
            "pid": os.getpid(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),  # serving.rank_niceness
            "loaded": self._loaded,
        }
        try:
            import ray

            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["placement_group_id"] = ctx.get_placement_group_id()
        except Exception:  # not inside Ray
            pass
        info.update(self.device_plan())
        return info

    def device_plan(self) -> dict[str, Any]:
        """The GPU Ray gave this rank and the CUDA index it uses (``engine.rank.devices``); on the
        CPU the index is None. Computed from the environment, without touching CUDA."""
        from engine.rank.devices import choose_device

        kind = "cuda" if self.config.device == "cuda" else self.config.resolved_device()
        ids = ray_gpu_ids()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        choice = choose_device(kind, self.rank, ray_gpu_ids=ids, cuda_visible_devices=visible)
        return {
            "ray_gpu_ids": [str(i) for i in ids],
            "cuda_visible_devices": visible,
            "cuda_index": choice.index,
            "local_rank": choice.local_rank,
            "gpu_id": choice.gpu_id,
        }

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        elif self.worker is not None and self._follower is None:
            self.worker.shutdown()

    def _engine(self) -> Any:
        if self.engine is None:
            if self.rank != 0:
                raise RuntimeError(f"rank {self.rank} has no engine; requests go to rank 0")
            raise EngineDeadError("the engine is not loaded yet")
        return self.engine


__all__ = ["RankActor", "resolve_engine_cls", "REAL_ENGINE"]
