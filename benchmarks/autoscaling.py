"""Autoscaling policies on simulated load traces: replicas over time and objective violations.

The same traces (a burst, a ramp, a diurnal cycle; ``cluster/autoscaling/simulation.py``) run under
three policies, all bounded to 1..8 replicas of 16 sequences, 20 s to start a replica:

- ``latency``: M-AI's policy (``cluster/autoscaling/policy.py``) with its default config;
- ``serve_default``: Serve's default policy (in-flight requests / target_ongoing_requests=16)
  with Serve's default delays (30 s up, 600 s down);
- ``serve_same_holds``: Serve's default policy with the latency policy's holds (5 s / 60 s),
  to separate the signal from the delays.

Writes JSON (``--out``): per trace and policy the share of requests over the TTFT objective,
p50/p90 TTFT, replica-seconds (cost), peak replicas and scale events; and a PNG next to it with
the replicas over time and the load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.autoscaling.policy import LatencyAutoscalingConfig  # noqa: E402
from cluster.autoscaling.simulation import TRACES, simulate  # noqa: E402

POLICIES = {
    "latency": ("latency", None),
    "serve_default": ("queue", (30.0, 600.0)),
    "serve_same_holds": ("queue", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = LatencyAutoscalingConfig()
    report: dict = {"ttft_objective_s": config.ttft_objective_s, "max_replicas": 8, "traces": {}}
    runs = {}
    for trace, (rate, duration) in TRACES.items():
        report["traces"][trace] = {}
        for label, (policy, delays) in POLICIES.items():
            result = simulate(rate, duration, policy, config, max_replicas=8, serve_delays=delays, seed=args.seed)
            runs[(trace, label)] = (result, rate)
            report["traces"][trace][label] = result.summary()
    print(f"{'trace':<9}{'policy':<18}{'over objective':>15}{'p90 TTFT s':>12}{'replica-s':>11}{'peak':>6}{'events':>8}")
    for trace, by_policy in report["traces"].items():
        for label, s in by_policy.items():
            print(f"{trace:<9}{label:<18}{s['violation_rate']:>15.1%}{s['ttft_p90_s']:>12.2f}"
                  f"{s['replica_seconds']:>11.0f}{s['max_replicas']:>6}{s['scale_events']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TRACES), 1, figsize=(9, 3.2 * len(TRACES)))
    for ax, trace in zip(axes, TRACES):
        for label in POLICIES:
            result, rate = runs[(trace, label)]
            ax.step(result.times, result.replicas, where="post", label=f"{label} "
                    f"({report['traces'][trace][label]['violation_rate']:.0%} over objective)")
        load = ax.twinx()
        times = runs[(trace, "latency")][0].times
        load.plot(times, [runs[(trace, "latency")][1](t) for t in times], color="gray", alpha=0.4)
        load.set_ylabel("requests/s", color="gray")
        ax.set_title(trace)
        ax.set_ylabel("replicas")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
