"""The replica's periodic figures (recorder captured, no Ray): an engine that does not answer
must not take the replica's own gauges with it (Ray drops a gauge not set for two export
periods, and the dashboards' panels go empty)."""

from __future__ import annotations

import asyncio
import time

from cluster.autoscaling.latency_window import LatencyWindow
from cluster.config import ModelConfig
from deployments.llm_server.monitor import ReplicaMonitor
from engine.types import EngineStats


class Capture:
    def __init__(self) -> None:
        self.sets: dict[str, float] = {}

    def set(self, name, value, **tags):
        self.sets[name] = value

    def inc(self, name, value=1.0, **tags):
        self.sets[name] = self.sets.get(name, 0.0) + value


class Call:
    """What ``actor.method.remote()`` gives: an awaitable."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def remote(self):
        return self.answer()


class Ranks:
    def __init__(self, stats) -> None:
        self.rank0 = type("Rank0", (), {"stats": Call(stats)})()
        self.actors = []


STATS = EngineStats(running=3, waiting=1, max_num_seqs=8, kv_slots_used=3, kv_slots_total=8, steps=10,
                    generated_tokens=40, kv_blocks_used=12, kv_blocks_total=48)


def monitor(stats, **options) -> tuple[ReplicaMonitor, Capture]:
    rec = Capture()
    return ReplicaMonitor(rec, Ranks(stats), ModelConfig(), interval_s=0.01, window=LatencyWindow(30), **options), rec


def test_a_sample_records_the_engine_and_the_replica():
    async def answer():
        return STATS

    mon, rec = monitor(answer)
    asyncio.run(mon.sample_once())
    assert rec.sets["num_requests_running"] == 3 and rec.sets["num_requests_waiting"] == 1
    assert rec.sets["kv_cache_usage_perc"] == 0.25
    assert rec.sets["process_resident_memory_bytes"] > 0  # this process, the replica
    assert "autoscaling_signal_seconds" in rec.sets


def test_the_default_wait_for_stats_is_bounded():
    mon, _ = monitor(None)
    assert mon.stats_timeout_s == 5.0
    assert ReplicaMonitor(Capture(), Ranks(None), ModelConfig(), interval_s=10).stats_timeout_s == 20


def test_an_engine_that_does_not_answer_times_out_and_leaves_the_replica_gauges():
    async def never():
        await asyncio.sleep(3600)

    mon, rec = monitor(never, stats_timeout_s=0.05)

    async def run():
        started = time.monotonic()
        try:
            await mon.sample_once()
        except TimeoutError:
            return time.monotonic() - started
        return None

    waited = asyncio.run(run())
    assert waited is not None and waited < 1.0
    assert rec.sets["process_resident_memory_bytes"] > 0 and "process_cpu_percent" in rec.sets
    assert "autoscaling_signal_seconds" in rec.sets and "kv_cache_usage_perc" not in rec.sets


def test_the_loop_keeps_sampling_while_the_engine_does_not_answer():
    calls = []

    async def never():
        calls.append(1)
        await asyncio.sleep(3600)

    mon, rec = monitor(never, stats_timeout_s=0.02)

    async def run():
        mon.start()
        await asyncio.sleep(0.5)
        mon.stop()

    asyncio.run(run())
    assert len(calls) >= 3  # a stuck call does not stop the next samples
    assert rec.sets["process_resident_memory_bytes"] > 0
