"""Autoscaling on latency: the decision as a pure function, and its Ray Serve adapter.

Serve's default policy scales on in-flight requests per replica. For an LLM that is a poor
proxy: 16 requests of 10 tokens and 16 of 1,000 load a replica very differently. This policy
scales on what users feel, the time to first token (TTFT) and the queue time that each
replica measures and reports through ``record_autoscaling_stats`` (p90 over the look-back
window, and the age of the oldest request still waiting for its first token):

- scale out when either exceeds its objective for ``upscale_hold_s``: latency decides
  *whether*, load decides *how many* (enough replicas for the in-flight requests at
  ``target_ongoing_requests`` each, at least one more, at most ``max_step_up`` more). Latency
  lags, so no further step is taken while the last step's replicas are still starting, for
  ``upscale_cooldown_s`` after they serve, or while the in-flight requests shrink (the backlog
  is being served down);
- scale in by one replica when both are below ``scale_in_fraction`` of their objectives for
  ``downscale_hold_s`` *and* the remaining replicas would carry the in-flight requests at no
  more than ``scale_in_load`` of ``target_ongoing_requests`` each, and no change happened for
  ``downscale_cooldown_s``;
- between the two thresholds nothing changes (hysteresis); bounds come from the config.

``decide`` is pure (tested with simulated traces in ``cluster/autoscaling/simulation.py``).
``LatencyAutoscalingPolicy`` is what Serve's controller calls (``autoscaling_config.policy``);
it imports nothing but this module's own dependencies (pydantic), so the controller only needs
the ``m-ai`` package importable (docs/autoscaling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICY_PATH = "cluster.autoscaling.policy:LatencyAutoscalingPolicy"
# Keys of the figures each replica returns from record_autoscaling_stats().
TTFT_KEY = "m_ai_ttft_p90_s"
QUEUE_KEY = "m_ai_queue_p90_s"
# While the objective is missed, in-flight requests below this share of what they were at the
# last step mean the backlog is being served down: no further step.
DRAINING = 0.98


class LatencyAutoscalingConfig(BaseModel):
    """``serving.autoscaling``: how the LLM deployments scale between min and max replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["latency", "queue"] = Field(
        "latency",
        description="`latency`: this module's policy on TTFT and queue time; `queue`: Serve's "
        "default policy on in-flight requests per replica (target_ongoing_requests).",
    )
    ttft_objective_s: float = Field(2.0, gt=0, description="Time-to-first-token objective (p90).")
    queue_objective_s: float = Field(1.0, gt=0, description="Queue-time objective (p90).")
    scale_in_fraction: float = Field(
        0.5, gt=0, lt=1, description="Scale in only while latency is below this share of the objectives."
    )
    scale_in_load: float = Field(
        0.6, gt=0, le=1,
        description="Scale in only if the replicas left would each carry at most this share of "
        "serving.target_ongoing_requests.",
    )
    upscale_hold_s: float = Field(5.0, ge=0, description="How long an objective must be missed before scaling out.")
    downscale_hold_s: float = Field(60.0, ge=0, description="How long latency must stay low before scaling in.")
    upscale_cooldown_s: float = Field(
        15.0, ge=0, description="No further scale-out sooner than this after the last one's replicas serve."
    )
    downscale_cooldown_s: float = Field(30.0, ge=0, description="No scale-in sooner than this after any change.")
    max_step_up: int = Field(4, ge=1, description="Replicas added by one decision at most.")
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which replicas compute the p90s they report."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas report to the Serve controller."
    )

    @model_validator(mode="after")
    def _check(self) -> LatencyAutoscalingConfig:
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"autoscaling.look_back_period_s={self.look_back_period_s} must be above "
                f"metrics_interval_s={self.metrics_interval_s}; raise the look-back or report more often"
            )
        return self


@dataclass(frozen=True)
class ScalingSignal:
    """What the policy sees at one decision (latencies in seconds; None: nothing measured)."""

    now: float
    replicas: int  # the current target (replicas starting included)
    running_replicas: int | None  # replicas serving now (None: unknown, taken as ``replicas``)
    ttft_s: float | None
    queue_s: float | None
    ongoing_requests: float
    target_ongoing_requests: float


@dataclass(frozen=True)
class ScalingState:
    """What the policy remembers between decisions."""

    breach_since: float | None = None
    calm_since: float | None = None
    last_change: float | None = None
    reference_load: float | None = None  # in-flight requests when the breach began or at the last step


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: ScalingState
    reason: str


def decide(
    signal: ScalingSignal,
    state: ScalingState,
    config: LatencyAutoscalingConfig,
    min_replicas: int,
    max_replicas: int,
) -> Decision:
    """The replicas wanted now (see the module docstring)."""
    n, now = signal.replicas, signal.now
    if n < min_replicas or n > max_replicas:
        bounded = min(max(n, min_replicas), max_replicas)
        return Decision(bounded, ScalingState(last_change=now), f"bounds [{min_replicas}, {max_replicas}]")
    ttft = signal.ttft_s or 0.0
    queue = signal.queue_s or 0.0
    pressure = max(ttft / config.ttft_objective_s, queue / config.queue_objective_s)
    if signal.ttft_s is None and signal.queue_s is None and signal.ongoing_requests > 0:
        return Decision(n, replace(state, breach_since=None, calm_since=None), "no latency reported yet")

    if pressure > 1.0:
        since = state.breach_since if state.breach_since is not None else now
        reference = state.reference_load if state.reference_load is not None else signal.ongoing_requests
        state = replace(state, breach_since=since, calm_since=None, reference_load=reference)
        if signal.running_replicas is not None and signal.running_replicas < n:
            # The last scale-out has not landed yet: its replicas will lower the latency. The
            # hold and the backlog's reference restart when they serve.
            return Decision(
                n, replace(state, breach_since=now, reference_load=None, last_change=now),
                f"objective missed ({pressure:.2f}x); waiting for {n - signal.running_replicas} "
                f"starting replicas",
            )
        if now - since < config.upscale_hold_s:
            return Decision(n, state, f"objective missed ({pressure:.2f}x) for {now - since:.1f}s, holding")
        if state.last_change is not None and now - state.last_change < config.upscale_cooldown_s:
            return Decision(n, state, f"objective missed ({pressure:.2f}x); letting the last step settle")
        if signal.ongoing_requests < DRAINING * reference:
            # Latency lags: a backlog that shrinks is being served fast enough already.
            return Decision(n, state, f"objective missed ({pressure:.2f}x) but the backlog shrinks "
                            f"({reference:.0f} -> {signal.ongoing_requests:.0f}), holding")
        by_load = math.ceil(signal.ongoing_requests / signal.target_ongoing_requests)
        by_latency = math.ceil(n * pressure)
        wanted = min(max_replicas, n + config.max_step_up, max(n + 1, by_load, by_latency))
        if wanted <= n:
            return Decision(n, state, f"objective missed ({pressure:.2f}x) but at max_replicas={max_replicas}")
        return Decision(
            wanted, ScalingState(last_change=now, reference_load=signal.ongoing_requests),
            f"objective missed ({pressure:.2f}x): scale out",
        )

    calm = pressure < config.scale_in_fraction
    load_ok = n > 1 and signal.ongoing_requests / (n - 1) <= (
        config.scale_in_load * signal.target_ongoing_requests
    )
    if not (calm and load_ok and n > min_replicas):
        why = "within the hysteresis band" if not calm else (
            "at min_replicas" if n <= min_replicas else "load too high to remove a replica"
        )
        return Decision(n, replace(state, breach_since=None, calm_since=None, reference_load=None), why)
    since = state.calm_since if state.calm_since is not None else now
    state = replace(state, breach_since=None, calm_since=since, reference_load=None)
    if now - since < config.downscale_hold_s:
        return Decision(n, state, f"latency low for {now - since:.1f}s, holding")
    if state.last_change is not None and now - state.last_change < config.downscale_cooldown_s:
        return Decision(n, state, "cooling down after the last change")
    return Decision(n - 1, ScalingState(last_change=now), f"latency {pressure:.2f}x of objective: scale in")


_STATE_KEYS = ("breach_since", "calm_since", "last_change", "reference_load")


def _mean(values: dict[Any, float] | None) -> float | None:
    if not values:
        return None
    return sum(values.values()) / len(values)


class LatencyAutoscalingPolicy:
    """Serve's custom policy (``policy_function: cluster.autoscaling:LatencyAutoscalingPolicy``).

    Serve instantiates it once with ``policy_kwargs`` (the config and the bounds) and calls it
    with an ``AutoscalingContext`` on every control-loop tick; it returns the replicas wanted
    and its state (kept by Serve between calls).
    """

    def __init__(self, min_replicas: int = 1, max_replicas: int = 1, **config: Any) -> None:
        self.config = LatencyAutoscalingConfig.model_validate(config)
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self._gauge: Any = None
        self.last_reason = ""

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        signal = ScalingSignal(
            now=ctx.current_time,
            replicas=ctx.target_num_replicas,
            running_replicas=ctx.current_num_replicas,
            ttft_s=_mean(metrics.get(TTFT_KEY)),
            queue_s=_mean(metrics.get(QUEUE_KEY)),
            ongoing_requests=float(ctx.total_num_requests or 0.0),
            target_ongoing_requests=float(ctx.config.target_ongoing_requests or 1.0),
        )
        saved = (ctx.policy_state or {}).get("m_ai", {})
        state = ScalingState(**{k: saved.get(k) for k in _STATE_KEYS})
        low = max(self.min_replicas, ctx.capacity_adjusted_min_replicas)
        high = max(low, min(self.max_replicas, ctx.capacity_adjusted_max_replicas))
        decision = decide(signal, state, self.config, low, high)
        self.last_reason = decision.reason
        self._report(ctx.deployment_name, decision.replicas)
        if decision.replicas != signal.replicas:
            self._publish(getattr(ctx, "app_name", None) or "", ctx.deployment_name, signal, decision)
        new_state = dict(ctx.policy_state or {})
        new_state["m_ai"] = {k: getattr(decision.state, k) for k in _STATE_KEYS}
        new_state["m_ai"]["reason"] = decision.reason
        return decision.replicas, new_state

    def _report(self, deployment: str, replicas: int) -> None:
        """The decision as a gauge (the controller is a Ray actor: its metrics are exported)."""
        try:
            if self._gauge is None:
                from ray.util.metrics import Gauge

                from cluster.observability.metric_specs import spec

                s = spec("autoscaling_desired_replicas")
                self._gauge = Gauge(s.full_name, s.description, tag_keys=s.labels)
            self._gauge.set(replicas, tags={"deployment": deployment})
        except Exception:  # metrics are best effort; the decision stands
            pass


    @staticmethod
    def _publish(app: str, deployment: str, signal: ScalingSignal, decision: Decision) -> None:
        """The last change this policy made, readable by operators and tests from Ray's
        key-value store (``last_scaling_decision``): proof that this policy, not Serve's
        default, scaled the deployment, and why."""
        try:
            import json

            from ray.experimental import internal_kv

            record = {"from": signal.replicas, "to": decision.replicas, "reason": decision.reason,
                      "at": signal.now, "policy": "m-ai latency"}
            internal_kv._internal_kv_put(decision_key(app, deployment), json.dumps(record), overwrite=True)
        except Exception:  # best effort, like the gauge; the decision stands
            pass


def decision_key(app: str, deployment: str) -> str:
    return f"m-ai/autoscaling/{app}/{deployment}"


def last_scaling_decision(app: str, deployment: str) -> dict[str, Any] | None:
    """The last replica change the latency policy made for ``deployment`` of ``app`` (None:
    it made none, e.g. Serve's default policy scales the deployment). Needs a Ray connection."""
    import json

    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(decision_key(app, deployment))
    return json.loads(raw) if raw else None


def serve_autoscaling_config(
    config: LatencyAutoscalingConfig, min_replicas: int, max_replicas: int, target_ongoing_requests: float
) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for a deployment scaled by ``config``."""
    base = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "look_back_period_s": config.look_back_period_s,
        "metrics_interval_s": config.metrics_interval_s,
    }
    if config.policy == "queue":
        # Serve's own hysteresis: the same holds, applied by its delay logic.
        return {**base, "upscale_delay_s": config.upscale_hold_s, "downscale_delay_s": config.downscale_hold_s}
    return {
        **base,
        # The policy keeps its own holds and cooldown: Serve's delays would add to them.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {
                "min_replicas": min_replicas,
                "max_replicas": max_replicas,
                **config.model_dump(exclude={"policy"}),
            },
        },
    }


__all__ = [
    "LatencyAutoscalingConfig", "ScalingSignal", "ScalingState", "Decision", "decide",
    "LatencyAutoscalingPolicy", "serve_autoscaling_config", "POLICY_PATH", "TTFT_KEY", "QUEUE_KEY",
    "last_scaling_decision", "decision_key",
]
