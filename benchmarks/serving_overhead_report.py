"""The report of ``benchmarks/serving_overhead.py``: its table, the CPU table and the plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.process_cpu import print_cpu_table

TARGETS = {"http_tokens_per_s_ratio": 0.90, "ttft_overhead_ms_p50": 15.0}
PATHS = ("engine", "handle", "http")


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def print_table(r: dict) -> None:
    res = r["results"]
    print(
        f"\n{'path':8}{'streams':>8}{'tokens/s':>10}{'x engine':>10}{'TTFT p50 ms':>13}"
        f"{'+ms':>8}{'TTFT p90 ms':>13}{'events/1k tokens':>18}"
    )
    for path, by_streams in res.items():
        for c, x in by_streams.items():
            base = res.get("engine", res[path])[c]
            print(
                f"{path:8}{c:8d}{x['tokens_per_s']:10.0f}{x['tokens_per_s'] / base['tokens_per_s']:10.3f}"
                f"{x['ttft_ms_p50']:13.1f}{x['ttft_ms_p50'] - base['ttft_ms_p50']:8.1f}"
                f"{x['ttft_ms_p90']:13.1f}{x['events_per_1k_tokens']:18.0f}"
            )
    print_cpu_table(r["cpu_s_per_1k_tokens"])
    load = r["load_average_1m"]
    print(
        f"\n{r['cpu_cores']} cores; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end"
    )
    for key, target in r.get("targets", {}).items():
        mark = "met" if r["targets_met"][key] else "MISSED"
        cmp = ">=" if key.endswith("ratio") else "<"
        print(f"{key:26} {r[key]:8.3f}  (target {cmp} {target}, {mark})")


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    res = r["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.25
    for i, p in enumerate(PATHS):
        xs = [j + (i - 1) * width for j in range(2)]
        ratios = [res[p][c]["tokens_per_s"] / res["engine"][c]["tokens_per_s"] for c in (1, 32)]
        bars = left.bar(xs, ratios, width, label=p)
        for bar, c in zip(bars, (1, 32)):
            left.annotate(
                f"{res[p][c]['tokens_per_s']:.0f}",
                (bar.get_x() + width / 2, 0.02),
                ha="center",
                fontsize=7,
                rotation=90,
                color="white",
            )
        right.bar(xs, [res[p][c]["ttft_ms_p50"] for c in (1, 32)], width, label=p)
    left.axhline(
        TARGETS["http_tokens_per_s_ratio"], color="gray", ls=":", label="target (HTTP, 32)"
    )
    left.set_ylim(0, 1.1)
    left.set_title("output tokens/s, relative to the engine (bars: absolute)")
    right.set_title("time to first token, p50 (ms)")
    for ax in (left, right):
        ax.set_xticks([0, 1], ["1 stream", "32 streams"])
        ax.legend(fontsize=8)
    engine = (
        f"fake engine, {r['fake_tokens_per_s_per_stream']:g} tokens/s per stream"
        if r["engine"] == "fake"
        else "tiny model on the CPU"
    )
    load = r["load_average_1m"]
    fig.suptitle(
        f"Serving overhead ({engine}; {r['cpu_cores']} cores, load {load['start']:.1f}-"
        f"{load['end']:.1f}):\nHTTP x{r['http_tokens_per_s_ratio']:.3f} tokens/s at 32 streams, "
        f"+{r['ttft_overhead_ms_p50']:.1f} ms TTFT at 1 stream",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
