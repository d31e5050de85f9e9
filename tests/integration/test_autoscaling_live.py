"""The latency policy live: a load on loopback takes the model from 1 replica to 2 and, once
it stops, back to 1 (short look-back and holds; Serve's controller runs the policy), each
change made by the latency policy for its reason (Serve's default policy would scale too, but
leaves no such decision); and the simulator's copy of Serve's default policy decides like
Serve's own code."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.autoscaling.policy import last_scaling_decision
from cluster.autoscaling.simulation import ServeDefaultState, serve_default_decide
from deployments.protocol import ChatCompletionRequest
from tests.support.serve_harness import FAKE_ENGINE, app_config, wait_until

MODEL = "m-ai-tiny"
FAST_POLICY = {
    "ttft_objective_s": 0.3, "queue_objective_s": 0.3, "upscale_hold_s": 1.0,
    "downscale_hold_s": 3.0, "upscale_cooldown_s": 2.0, "downscale_cooldown_s": 3.0,
    "look_back_period_s": 3.0, "metrics_interval_s": 0.5,
}


def running_replicas(app) -> int:
    from ray import serve

    deployment = serve.status().applications[app.name].deployments["llm-" + MODEL]
    return deployment.replica_states.get("RUNNING", 0)


def test_load_scales_one_to_two_and_back(serve_cluster):
    config = app_config(
        models=[{"name": MODEL, "max_num_seqs": 2}],
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, autoscaling=FAST_POLICY,
    )
    # The fake engine: replicas that start without a model load, so scaling is seen in time.
    app = serve_cluster.deploy(
        config, prefix="scale", engine_cls=FAKE_ENGINE,
        engine_options={"tokens_per_s": 50.0, "tokenizer": "bytes"},
    )
    try:
        assert running_replicas(app) == 1
        stop = threading.Event()
        request = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=25, temperature=0.0)

        def client() -> None:
            while not stop.is_set():
                app.handle.chat.remote(request).result()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        started = time.monotonic()
        try:
            wait_until(lambda: running_replicas(app) == 2, timeout_s=60, interval_s=0.5, what="2 replicas")
            scaled_out_after = time.monotonic() - started
            out = last_scaling_decision(app.name, "llm-" + MODEL)
            assert out is not None, "the replicas changed, but not by the latency policy"
            assert (out["from"], out["to"]) == (1, 2) and "objective missed" in out["reason"], out
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        wait_until(lambda: running_replicas(app) == 1, timeout_s=60, interval_s=0.5, what="back to 1 replica")
        back = last_scaling_decision(app.name, "llm-" + MODEL)
        assert (back["from"], back["to"]) == (2, 1) and "scale in" in back["reason"], back
        print(f"scaled out {scaled_out_after:.1f}s after the load began; back to 1 after "
              f"{time.monotonic() - started - scaled_out_after:.1f}s")
    finally:
        app.delete()


def _serve_policy_decision(ongoing, target, current, state, now):
    from ray.serve.autoscaling_policy import (
        _apply_default_params,
        replica_queue_length_autoscaling_policy,
    )
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target,
                               upscale_delay_s=5.0, downscale_delay_s=20.0)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.current_num_replicas = ctx.target_num_replicas = current
    ctx.total_num_requests = ongoing
    ctx.config = config
    ctx.policy_state = state
    desired, _ = replica_queue_length_autoscaling_policy(ctx)
    import ray.serve.autoscaling_policy as policy_module

    real_time = policy_module.time.time
    policy_module.time.time = lambda: now
    try:
        decided, state = _apply_default_params(desired, ctx, state)
    finally:
        policy_module.time.time = real_time
    return min(max(decided, 1), 8), state


@pytest.mark.parametrize("load", [[40] * 12 + [2] * 30, [5, 50, 5, 50, 60, 70, 80, 90, 2, 2, 2] * 3])
def test_simulated_default_policy_matches_serve_s_code(load):
    ours_state, serve_state = ServeDefaultState(), {}
    ours = theirs = 1
    for step, ongoing in enumerate(load):
        now = float(step)
        ours = serve_default_decide(ongoing, 16.0, ours, ours_state, 5.0, 20.0, now, 1, 8)
        theirs, serve_state = _serve_policy_decision(ongoing, 16.0, theirs, serve_state, now)
        assert ours == theirs, f"step {step}: ongoing {ongoing}"
