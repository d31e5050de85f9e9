"""A replica's periodic figures: engine state and resource usage, every few seconds.

Started by each LLMServer replica as an asyncio task. Every ``interval_s`` it asks the rank-0
rank for the engine's stats (an actor call: it does not wait in Serve's request queue) and
samples the CPU and memory of the replica process and of each rank actor, and sets the
gauges: requests running and waiting, mean batch size over the interval, KV block use, prefix
cache hit rate (and the hit, query and preemption counters), per-process CPU / RSS / GPU memory, KV cache bytes per rank, and the latency
this replica reports to the autoscaler.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from cluster.autoscaling.latency_window import LatencyWindow
from cluster.logging_setup import get_logger
from deployments.llm_server.metrics import MetricsRecorder
from deployments.llm_server.resource_usage import ProcessSampler, kv_cache_bytes

log = get_logger("deployments.llm_server.monitor")


class ReplicaMonitor:
    def __init__(
        self,
        recorder: MetricsRecorder,
        ranks: Any,
        config: Any,
        interval_s: float,
        window: LatencyWindow | None = None,
        stats_timeout_s: float | None = None,
    ) -> None:
        self.recorder = recorder
        self.ranks = ranks
        self.config = config
        self.interval_s = interval_s
        self.window = window
        # how long a sample waits for the engine's stats: a loaded engine gets time, not forever
        self.stats_timeout_s = stats_timeout_s if stats_timeout_s is not None else max(5.0, 2 * interval_s)
        self.sampler = ProcessSampler()
        self._pids: dict[str, int] = {"replica": os.getpid()}
        self._last: tuple[int, int] | None = None  # (steps, generated tokens)
        self._counted = {"prefix_cache_queries_total": 0, "prefix_cache_hits_total": 0, "num_preemptions_total": 0}
        self._task: asyncio.Task | None = None

    def start(self) -> ReplicaMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        try:
            for i, actor in enumerate(self.ranks.actors):
                info = await asyncio.wait_for(actor.describe.remote(), self.stats_timeout_s)
                self._pids[f"rank-{i}"] = int(info["pid"])
        except Exception:
            log.warning("rank pids unknown; only the replica's resources are reported", exc_info=True)
        while True:
            try:
                await self.sample_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a dead engine is the health check's business, not ours
                log.debug("replica sample failed", exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def sample_once(self) -> None:
        # The replica's own figures first. Ray drops a gauge that was not set within two of
        # its export periods (2 x 10 s): a slow engine must not take them off the dashboards.
        self.record_replica()
        stats = await asyncio.wait_for(self.ranks.rank0.stats.remote(), self.stats_timeout_s)
        self.record_engine(stats)

    def record_engine(self, stats: Any) -> None:
        rec = self.recorder
        rec.set("num_requests_running", stats.running)
        rec.set("num_requests_waiting", stats.waiting)
        if stats.kv_blocks_total:
            rec.set("kv_cache_usage_perc", stats.kv_blocks_used / stats.kv_blocks_total)
        else:  # an engine without a paged cache (the fake one): its sequence slots
            rec.set("kv_cache_usage_perc", stats.kv_slots_used / max(1, stats.kv_slots_total))
        rec.set("prefix_cache_hit_rate", stats.prefix_cache_hit_rate)
        totals = {"prefix_cache_queries_total": stats.prefix_cache_queries,
                  "prefix_cache_hits_total": stats.prefix_cache_hit_tokens,
                  "num_preemptions_total": stats.num_preemptions}
        for name, total in totals.items():  # the engine's counters since start, as increments
            if total > self._counted[name]:
                rec.inc(name, total - self._counted[name])
            self._counted[name] = total
        if self._last is not None:
            steps = stats.steps - self._last[0]
            tokens = stats.generated_tokens - self._last[1]
            rec.set("batch_size", tokens / steps if steps > 0 else 0.0)
        self._last = (stats.steps, stats.generated_tokens)

    def record_replica(self) -> None:
        """What this replica knows without asking the engine: its processes' CPU and memory,
        and the latency it reports to the autoscaler."""
        rec = self.recorder
        if self.window is not None:
            report = self.window.report()
            rec.set("autoscaling_signal_seconds", report["ttft"], signal="ttft")
            rec.set("autoscaling_signal_seconds", report["queue"], signal="queue")
        rank_kv = kv_cache_bytes(self.config)
        for actor, pid in self._pids.items():
            usage = self.sampler.sample(pid)
            if usage is None:
                continue
            rec.set("process_cpu_percent", usage.cpu_percent, actor=actor)
            rec.set("process_resident_memory_bytes", usage.rss_bytes, actor=actor)
            if usage.gpu_bytes is not None:
                rec.set("process_gpu_memory_bytes", usage.gpu_bytes, actor=actor)
            if actor.startswith("rank-"):
                rec.set("kv_cache_bytes", rank_kv, actor=actor)


__all__ = ["ReplicaMonitor"]
