"""The latency autoscaling policy: decisions, its Serve adapter, and simulated load traces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.autoscaling.latency_window import LatencyWindow, quantile
from cluster.autoscaling.policy import (
    POLICY_PATH,
    QUEUE_KEY,
    TTFT_KEY,
    LatencyAutoscalingConfig,
    LatencyAutoscalingPolicy,
    ScalingSignal,
    ScalingState,
    decide,
    serve_autoscaling_config,
)
from cluster.autoscaling.simulation import TRACES, simulate

CFG = LatencyAutoscalingConfig(
    ttft_objective_s=1.0, queue_objective_s=0.5, upscale_hold_s=5, downscale_hold_s=20,
    upscale_cooldown_s=10, downscale_cooldown_s=30, look_back_period_s=30, metrics_interval_s=5,
)


def sig(now, n=1, ttft=0.2, queue=0.0, ongoing=4.0, running=None, target=16.0):
    return ScalingSignal(now, n, running, ttft, queue, ongoing, target)


def run(signals, state=ScalingState(), lo=1, hi=4):
    out = []
    for s in signals:
        d = decide(s, state, CFG, lo, hi)
        state = d.state
        out.append(d)
    return out


def test_scale_out_only_after_the_hold_and_sized_by_load():
    ds = run([sig(t, ttft=3.0, ongoing=40) for t in range(0, 7)])
    assert [d.replicas for d in ds[:5]] == [1] * 5 and "holding" in ds[0].reason
    assert ds[5].replicas == 3  # 40 in flight / 16 per replica -> 3 (at t = 5 s)
    assert "scale out" in ds[5].reason


def test_queue_time_alone_triggers_and_max_replicas_bounds():
    ds = run([sig(t, n=3, queue=2.0, ongoing=200) for t in range(0, 7)], hi=4)
    assert ds[5].replicas == 4  # bounded by max_replicas
    d = decide(sig(20, n=4, queue=2.0, ongoing=200), ScalingState(breach_since=0), CFG, 1, 4)
    assert d.replicas == 4 and "max_replicas" in d.reason


def test_no_further_step_while_replicas_start_or_the_backlog_shrinks():
    state = ScalingState(breach_since=0.0, reference_load=100.0)
    starting = decide(sig(10, n=3, running=1, ttft=5.0, ongoing=120), state, CFG, 1, 8)
    assert starting.replicas == 3 and "starting" in starting.reason
    # once they serve, the hold restarts and the backlog is compared with its size then
    landed = run([sig(10 + t, n=3, running=3, ttft=5.0, ongoing=120 - 3 * t) for t in range(0, 20)],
                 starting.state, hi=8)
    assert all(d.replicas == 3 for d in landed) and "shrinks" in landed[-1].reason
    growing = run([sig(10 + t, n=3, running=3, ttft=5.0, ongoing=120 + 3 * t) for t in range(0, 20)],
                  starting.state, hi=8)
    assert max(d.replicas for d in growing) > 3


def test_scale_in_needs_low_latency_low_load_the_hold_and_the_cooldown():
    calm = [sig(t, n=3, ttft=0.1, ongoing=2) for t in range(0, 25)]
    ds = run(calm, ScalingState(last_change=-100.0), hi=4)
    assert [d.replicas for d in ds].index(2) == 20  # after downscale_hold_s
    busy = run([sig(t, n=3, ttft=0.1, ongoing=30) for t in range(0, 25)], ScalingState(last_change=-100.0))
    assert all(d.replicas == 3 for d in busy) and "load too high" in busy[-1].reason
    band = run([sig(t, n=3, ttft=0.8, ongoing=2) for t in range(0, 25)])  # between 0.5x and 1x
    assert all(d.replicas == 3 for d in band) and "hysteresis" in band[-1].reason
    recent = run(calm, ScalingState(last_change=10.0))
    assert all(d.replicas == 3 for d in recent) and "cooling" in recent[-1].reason
    assert run([sig(0, n=1, ttft=0.0, ongoing=0)])[0].replicas == 1  # never below min


def test_serve_adapter_reads_replica_stats_and_keeps_state():
    policy = LatencyAutoscalingPolicy(min_replicas=1, max_replicas=3, **CFG.model_dump(exclude={"policy"}))
    state: dict = {}
    replicas, decisions = 1, []
    for t in range(0, 8):
        ctx = SimpleNamespace(
            aggregated_metrics={TTFT_KEY: {"r1": 4.0}, QUEUE_KEY: {"r1": 0.1}},
            current_time=float(t), target_num_replicas=replicas, current_num_replicas=1,
            total_num_requests=20.0, config=SimpleNamespace(target_ongoing_requests=16.0),
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3,
            policy_state=state, deployment_name="llm-m",
        )
        replicas, state = policy(ctx)
        decisions.append(replicas)
    assert decisions == [1, 1, 1, 1, 1, 3, 3, 3]  # the 5 s hold, then 4x the objective -> max 3
    assert "starting" in state["m_ai"]["reason"]  # the new replicas are not running yet


def test_serve_options_carry_the_policy_and_its_bounds():
    opts = serve_autoscaling_config(CFG, 1, 3, 16.0)
    assert opts["policy"]["policy_function"] == POLICY_PATH
    assert opts["policy"]["policy_kwargs"]["max_replicas"] == 3
    assert opts["upscale_delay_s"] == opts["downscale_delay_s"] == 0.0
    LatencyAutoscalingPolicy(**opts["policy"]["policy_kwargs"])  # Serve instantiates it like this
    queue = serve_autoscaling_config(CFG.model_copy(update={"policy": "queue"}), 1, 3, 16.0)
    assert "policy" not in queue and queue["upscale_delay_s"] == 5
    with pytest.raises(ValueError, match="look_back_period_s"):
        LatencyAutoscalingConfig(look_back_period_s=1, metrics_interval_s=2)


def test_latency_window_reports_p90_and_the_oldest_waiting_request():
    clock = [0.0]
    w = LatencyWindow(window_s=10, clock=lambda: clock[0])
    for i in range(10):
        w.started(f"r{i}")
        w.first_token(f"r{i}", ttft_s=0.1 * (i + 1), queue_s=0.01 * i)
    assert w.report()["ttft"] == pytest.approx(0.9)
    w.started("stuck")
    clock[0] = 5.0
    assert w.report()["ttft"] == pytest.approx(5.0) and w.report()["waiting"] == 1
    w.finished("stuck")
    clock[0] = 20.0
    assert w.report() == {"ttft": 0.0, "queue": 0.0, "waiting": 0.0}
    assert quantile([], 0.9) == 0.0 and quantile([3, 1, 2], 0.5) == 2


@pytest.mark.parametrize("trace", sorted(TRACES))
def test_simulated_traces_latency_policy_beats_serves_default(trace):
    """Fewer requests over the TTFT objective than Serve's default policy (its default
    30 s / 600 s delays) on the same trace, and back down once the load is gone."""
    rate, duration = TRACES[trace]
    config = LatencyAutoscalingConfig()
    ours = simulate(rate, duration, "latency", config, max_replicas=8)
    serve = simulate(rate, duration, "queue", config, max_replicas=8, serve_delays=(30.0, 600.0))
    assert ours.violation_rate < serve.violation_rate, (ours.summary(), serve.summary())
    assert max(ours.replicas) > 1  # it scaled out under load
    assert ours.replicas[-1] < max(ours.replicas)  # and in again as the load fell
