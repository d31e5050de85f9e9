"""A small simulation of LLM replicas under a load trace, to compare autoscaling policies.

Not a model of Ray: a model of what matters to the decision. Requests arrive (Poisson, at a
rate given by the trace), wait in one queue, and run on replicas that each batch up to
``slots`` sequences; a sequence's decode step slows as the batch grows, like an engine's. A new
replica serves only after ``start_s`` (the model loads). Every ``tick_s`` each policy decides
from what a real deployment would show it:

- ``latency``: ``cluster.autoscaling.decide`` on the replicas' p90 TTFT and queue time over the
  look-back (and the oldest waiting request), as ``record_autoscaling_stats`` reports them;
- ``queue``: Serve's default policy (``ceil(ongoing / target_ongoing_requests)``) with Serve's
  delay logic, re-implemented here (``serve_default_decide``; a test checks it against Ray's).

Outputs per policy: replicas over time, TTFT of every request, the share of requests over the
TTFT objective, and replica-seconds (cost).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.autoscaling.latency_window import quantile
from cluster.autoscaling.policy import LatencyAutoscalingConfig, ScalingSignal, ScalingState, decide

Trace = Callable[[float], float]  # time (s) -> arrival rate (requests/s)


def burst_trace(base: float = 2.0, peak: float = 14.0, start: float = 120.0, length: float = 120.0) -> Trace:
    return lambda t: peak if start <= t < start + length else base


def ramp_trace(low: float = 1.0, high: float = 14.0, up_s: float = 400.0, down_s: float = 300.0) -> Trace:
    def rate(t: float) -> float:
        if t < up_s:
            return low + (high - low) * t / up_s
        return max(low, high - (high - low) * (t - up_s) / down_s)

    return rate


def diurnal_trace(low: float = 1.0, high: float = 12.0, period_s: float = 600.0) -> Trace:
    return lambda t: low + (high - low) * 0.5 * (1 - math.cos(2 * math.pi * t / period_s))


TRACES: dict[str, tuple[Trace, float]] = {
    "burst": (burst_trace(), 480.0),
    "ramp": (ramp_trace(), 800.0),
    "diurnal": (diurnal_trace(), 1200.0),
}


@dataclass(frozen=True)
class ReplicaModel:
    slots: int = 16  # max_num_seqs
    prefill_s: float = 0.15
    step_s: float = 0.03  # decode step at batch 1
    step_per_seq_s: float = 0.002  # extra step time per running sequence
    output_tokens: int = 64
    start_s: float = 20.0  # from the decision to a serving replica


@dataclass
class _Replica:
    ready_at: float
    running: list[float] = field(default_factory=list)  # finish times
    draining: bool = False  # removed by the policy: takes no new requests, finishes its own


@dataclass
class SimResult:
    policy: str
    times: list[float]
    replicas: list[int]
    ttfts: list[float]
    objective_s: float

    @property
    def violation_rate(self) -> float:
        return sum(t > self.objective_s for t in self.ttfts) / max(1, len(self.ttfts))

    @property
    def replica_seconds(self) -> float:
        dt = self.times[1] - self.times[0] if len(self.times) > 1 else 0.0
        return sum(self.replicas) * dt

    def summary(self) -> dict[str, float]:
        return {
            "requests": len(self.ttfts),
            "violation_rate": round(self.violation_rate, 4),
            "ttft_p50_s": round(quantile(self.ttfts, 0.5), 3),
            "ttft_p90_s": round(quantile(self.ttfts, 0.9), 3),
            "replica_seconds": round(self.replica_seconds, 1),
            "max_replicas": max(self.replicas, default=0),
            "scale_events": sum(1 for a, b in zip(self.replicas, self.replicas[1:]) if a != b),
        }


@dataclass
class ServeDefaultState:
    counter: int = 0
    since: float | None = None


def serve_default_decide(
    ongoing: float, target_ongoing: float, current: int, state: ServeDefaultState,
    upscale_delay_s: float, downscale_delay_s: float, now: float, min_r: int, max_r: int,
) -> int:
    """Serve 2.60's default policy and delay logic (``replica_queue_length_autoscaling_policy``)."""
    desired = math.ceil(ongoing / target_ongoing) if current else current
    decision = current
    if desired > current:
        if state.counter < 0:
            state.counter, state.since = 0, None
        state.counter += 1
        state.since = now if state.since is None else state.since
        if now - state.since + 1e-6 >= upscale_delay_s:
            state.counter, state.since, decision = 0, None, desired
    elif desired < current:
        if state.counter > 0:
            state.counter, state.since = 0, None
        state.counter -= 1
        state.since = now if state.since is None else state.since
        if now - state.since + 1e-6 >= downscale_delay_s:
            state.counter, state.since, decision = 0, None, max(1, desired)
    else:
        state.counter, state.since = 0, None
    return min(max(decision, min_r), max_r)


def simulate(
    trace: Trace,
    duration_s: float,
    policy: str,
    config: LatencyAutoscalingConfig,
    *,
    min_replicas: int = 1,
    max_replicas: int = 8,
    target_ongoing: float = 16.0,
    model: ReplicaModel = ReplicaModel(),
    serve_delays: tuple[float, float] | None = None,
    tick_s: float = 0.5,
    seed: int = 0,
) -> SimResult:
    """Run ``policy`` (``latency`` or ``queue``) over ``trace``. ``serve_delays``: the queue
    policy's (upscale, downscale) delays; default: the same holds as the latency policy."""
    rng = random.Random(seed)
    up_delay, down_delay = serve_delays or (config.upscale_hold_s, config.downscale_hold_s)
    replicas = [_Replica(ready_at=0.0) for _ in range(min_replicas)]
    target = min_replicas
    queue: deque[float] = deque()  # arrival times
    window: deque[tuple[float, float, float]] = deque()  # (admitted at, ttft, queue wait)
    load: deque[tuple[float, int]] = deque()  # in-flight requests over the look-back
    state, serve_state = ScalingState(), ServeDefaultState()
    times, counts, ttfts = [], [], []
    t = 0.0
    while t < duration_s:
        # arrivals over this tick (Poisson), spread uniformly in it
        lam = trace(t) * tick_s
        n_new = _poisson(rng, lam)
        queue.extend(sorted(t + rng.random() * tick_s for _ in range(n_new)))
        # serve: finished sequences leave, waiting requests take free slots of ready replicas
        for r in replicas:
            r.running = [f for f in r.running if f > t]
        replicas = [r for r in replicas if not (r.draining and not r.running)]
        serving = [r for r in replicas if r.ready_at <= t and not r.draining]
        for r in sorted(serving, key=lambda r: len(r.running)):
            while queue and len(r.running) < model.slots and queue[0] <= t + tick_s:
                arrived = queue.popleft()
                start = max(t, arrived)
                step = model.step_s + model.step_per_seq_s * (len(r.running) + 1)
                ttft = (start - arrived) + model.prefill_s + step
                r.running.append(start + model.prefill_s + step * model.output_tokens)
                ttfts.append(ttft)
                window.append((t, ttft, start - arrived))
        while window and t - window[0][0] > config.look_back_period_s:
            window.popleft()
        # decide; like Serve, both policies see in-flight requests averaged over the look-back
        load.append((t, len(queue) + sum(len(r.running) for r in replicas)))
        while t - load[0][0] > config.look_back_period_s:
            load.popleft()
        ongoing = sum(n for _, n in load) / len(load)
        if policy == "latency":
            oldest = t - queue[0] if queue and queue[0] <= t else 0.0
            signal = ScalingSignal(
                now=t, replicas=target,
                running_replicas=sum(1 for r in replicas if r.ready_at <= t and not r.draining),
                ttft_s=max(quantile([w[1] for w in window], 0.9), oldest) if (window or oldest) else None,
                queue_s=quantile([w[2] for w in window], 0.9) if window else None,
                ongoing_requests=ongoing, target_ongoing_requests=target_ongoing,
            )
            d = decide(signal, state, config, min_replicas, max_replicas)
            state, wanted = d.state, d.replicas
        elif policy == "queue":
            wanted = serve_default_decide(
                ongoing, target_ongoing, target, serve_state, up_delay, down_delay, t,
                min_replicas, max_replicas,
            )
        else:
            raise ValueError(f"policy={policy!r} is unknown; use latency or queue")
        while target < wanted:
            replicas.append(_Replica(ready_at=t + model.start_s))
            target += 1
        while target > wanted:
            # Serve stops the least busy replica gracefully: it finishes what it runs
            victim = min((r for r in replicas if not r.draining), key=lambda r: len(r.running))
            victim.draining = True
            target -= 1
        times.append(t)
        counts.append(len(replicas))  # draining replicas still cost
        t += tick_s
    return SimResult(policy, times, counts, ttfts, config.ttft_objective_s)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


__all__ = [
    "TRACES", "ReplicaModel", "SimResult", "simulate", "serve_default_decide", "ServeDefaultState",
    "burst_trace", "ramp_trace", "diurnal_trace",
]
