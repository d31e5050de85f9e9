"""Serving benchmark over the HTTP API, in the manner of vLLM's benchmark_serving and GuideLLM.

It starts its own local Ray (own temp dir, no dashboard) with Serve bound to 127.0.0.1 and the
application on the **real tiny engine** (``--engine fake`` for the fake one), then for each
request rate sends ``--num-prompts`` streamed chat requests (``POST /v1/chat/completions``,
``stream=true``, usage in the last chunk) with Poisson arrivals (exponential gaps, mean
1/rate; ``inf`` sends them all at once), optionally capped at ``--max-concurrency`` requests in
flight. ``--url`` benchmarks a server that is already running instead.

Workload: synthetic, shaped like chat traffic (ShareGPT-like: long-tailed lengths, most
conversations one turn, some with history), scaled down for a small model on a CPU, drawn
from a seeded ``random.Random`` (``--seed``) so every rate gets the same requests:

- 70% one user turn, 30% a system prompt plus one earlier user/assistant exchange;
- each user turn: lognormal word count, median ``--prompt-words`` (default 40), sigma 0.6,
  clipped to [4, 8x median], words from the tiny tokenizer's corpus lists;
- ``max_tokens``: lognormal, median ``--output-tokens`` (default 48), sigma 0.5, clipped to
  [8, 4x median]; temperature 0.7 (the answer may end earlier at the end-of-sequence token:
  the figures count the tokens actually produced, from ``usage``).

The ingress's output pipeline runs as deployed (``--no-output-processing`` turns it off); with
its defaults it streams token by token. Configured to hold text back to safe boundaries (a
sentence, a line), it turns TTFT into time to the first safe segment.

Per request: TTFT (sent -> first content), ITL (gaps between content events; an event may
carry several tokens, see ``serving.stream_interval_ms``), TPOT ((e2e - TTFT) / (tokens - 1))
and end-to-end latency. Per rate: request throughput, output tokens/s, mean/p50/p90/p99 of
each latency, error rate, and goodput (requests/s meeting every objective of ``--goodput``).
By default (``--goodput auto:3``) the objectives are 3x the median TTFT and TPOT of
``SINGLE_STREAM_REQUESTS`` requests sent one at a time first, in the same run (printed and in
the JSON as ``single_stream`` and each rate's ``goodput_objectives_ms``).

``python benchmarks/serve_bench.py --out F`` writes JSON with a list ``rates`` (each with
``request_rate``, ``output_tokens_per_s``, ``ttft_ms`` and ``itl_ms`` with p50/p90/p99, and
``error_rate``) and a PNG of latency against request rate next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "m-ai-tiny"
PERCENTILES = (50, 90, 99)
# Objectives at 3x the TTFT and TPOT one request alone gets (measured first, same run): fixed
# objectives that the machine meets at any load make goodput equal throughput.
DEFAULT_GOODPUT = "auto:3"
SINGLE_STREAM_REQUESTS = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workload ---------------------------------------------------------------------------------


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def chat_workload(
    n: int, seed: int, prompt_words: int, output_tokens: int
) -> list[dict[str, Any]]:
    """``n`` chat request bodies drawn from the distribution of the module docstring."""
    from engine.tiny.corpus import word_lists

    lists = word_lists()
    vocab = [w for name in ("nouns", "verbs", "adjectives", "adverbs", "names") for w in lists[name]]
    topics = list(lists["topics"])
    rng = random.Random(seed)

    def text(words: int) -> str:
        body = " ".join(rng.choice(vocab) for _ in range(words))
        return f"Tell me about {rng.choice(topics)}: {body}."

    def user_words() -> int:
        return _lognormal_int(rng, prompt_words, 0.6, 4, 8 * prompt_words)

    bodies = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
            messages.append({"role": "user", "content": text(user_words())})
            messages.append({"role": "assistant", "content": text(user_words() // 2 + 2)})
        messages.append({"role": "user", "content": text(user_words())})
        bodies.append(
            {
                "model": MODEL,
                "messages": messages,
                "max_tokens": _lognormal_int(rng, output_tokens, 0.5, 8, 4 * output_tokens),
                "temperature": 0.7,
                "seed": rng.randrange(1 << 30),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


# -- one request ------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    events: int = 0

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def stream_one(client: Any, body: dict[str, Any], timeout_s: float) -> Result:
    """Send one streamed chat request and time its events (never raises)."""
    result = Result()
    try:
        await asyncio.wait_for(_stream(client, body, result), timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout_s:.0f}s"
    except Exception as exc:  # a connection error is a failed request, not a failed benchmark
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def _stream(client: Any, body: dict[str, Any], result: Result) -> None:
    start = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            result.error = f"HTTP {response.status_code}: {text[:200]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = f"stream error: {chunk['error'].get('message', '')[:200]}"
                return
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                result.events += 1
    result.e2e_s = time.perf_counter() - start
    result.ok = last is not None and result.output_tokens > 0
    if not result.ok:
        result.error = "the stream ended without content or usage"


# -- one rate ---------------------------------------------------------------------------------


async def run_rate(
    url: str,
    bodies: list[dict[str, Any]],
    rate: float,
    max_concurrency: int | None,
    seed: int,
    timeout_s: float,
) -> tuple[list[Result], float]:
    """All ``bodies`` at Poisson arrivals of ``rate`` per second; (results, wall seconds)."""
    import httpx

    rng = random.Random(seed)
    limit = max_concurrency or len(bodies)
    gate = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    done = 0

    async def one(body: dict[str, Any]) -> Result:
        nonlocal done
        async with gate:
            result = await stream_one(client, body, timeout_s)
        done += 1
        if done % max(1, len(bodies) // 5) == 0 or done == len(bodies):
            log(f"  {done}/{len(bodies)} done")
        return result

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
        start = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            tasks.append(asyncio.create_task(one(body)))
            if math.isfinite(rate) and i + 1 < len(bodies):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# -- figures ----------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 in milliseconds (None without values)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = sorted(1000 * v for v in values)
    out: dict[str, float | None] = {"mean": statistics.fmean(ms)}
    for p in PERCENTILES:
        # nearest-rank on the sorted values, as vLLM's numpy percentile does for large n
        out[f"p{p}"] = ms[min(len(ms) - 1, max(0, math.ceil(p / 100 * len(ms)) - 1))]
    return out


def auto_factor(spec: str) -> float | None:
    """``"auto:3"`` -> 3.0 (objectives from the single-stream run); None for explicit ones."""
    name, _, value = spec.strip().partition(":")
    if name != "auto":
        return None
    try:
        factor = float(value or "3")
    except ValueError:
        raise SystemExit(f"--goodput: {spec!r} is not auto:FACTOR") from None
    if factor <= 1:
        raise SystemExit(f"--goodput: auto factor {factor:g} must be above 1")
    return factor


def single_stream_objectives(results: list[Result], factor: float) -> tuple[dict[str, float], dict[str, float]]:
    """(objectives, medians) in ms: ``factor`` x the median TTFT and TPOT of ``results``."""
    ok = [r for r in results if r.ok]
    if not ok:
        raise SystemExit("the single-stream requests all failed: no goodput objectives")
    ttft = statistics.median(r.ttft_s for r in ok) * 1000
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    medians = {"ttft": ttft, "tpot": statistics.median(tpots) * 1000 if tpots else 0.0}
    objectives = {k: round(factor * v, 1) for k, v in medians.items() if v > 0}
    return objectives, medians


def parse_goodput(spec: str) -> dict[str, float]:
    """``"ttft:2000,tpot:200,e2el:10000"`` -> objectives in milliseconds."""
    objectives = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"--goodput: {part!r} is not NAME:MS with NAME in ttft, tpot, e2el")
        objectives[name] = float(value)
    return objectives


def meets(result: Result, objectives: dict[str, float]) -> bool:
    values = {"ttft": result.ttft_s, "tpot": result.tpot_s or 0.0, "e2el": result.e2e_s}
    return result.ok and all(1000 * values[k] <= v for k, v in objectives.items())


def rate_figures(
    rate: float,
    max_concurrency: int | None,
    results: list[Result],
    wall_s: float,
    objectives: dict[str, float],
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"HTTP {r.status}" if r.status not in (0, 200) else r.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / len(results) if results else 0.0,
        "errors": errors,
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s,
        "tokens_per_event": tokens / max(1, sum(r.events for r in ok)),
        "ttft_ms": summary([r.ttft_s for r in ok]),
        "itl_ms": summary([gap for r in ok for gap in r.itl_s]),
        "tpot_ms": summary([t for r in ok if (t := r.tpot_s) is not None]),
        "e2el_ms": summary([r.e2e_s for r in ok]),
        "goodput_objectives_ms": objectives,
        "goodput_req_per_s": sum(meets(r, objectives) for r in results) / wall_s,
        "sample_errors": sorted({r.error for r in results if not r.ok})[:5],
    }


# -- the server -------------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[str, str]:
    """Local Ray + Serve on 127.0.0.1 and the app; returns (url, Ray temp dir)."""
    import socket

    from ray import serve

    from cluster.config import build_app_config
    from deployments.app import FAKE_ENGINE, build_app
    from deployments.cli.main import start_local_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    temp_dir = start_local_ray(8, log_to_driver=False)  # as `m-ai serve` starts it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = build_app_config(
        {
            "models": [
                {
                    "model_size": "tiny",
                    "tp_size": args.tp_size,
                    "max_num_seqs": args.max_num_seqs,
                    "context_length": 1024,
                    "dtype": "float32",
                }
            ],
            "serving": {
                "replica_num_cpus": 0.1,
                "ingress_num_cpus": 0.1,
                "rank_num_cpus": 1.0,
                "graceful_shutdown_timeout_s": 1,
                "graceful_shutdown_wait_loop_s": 0.1,
            },
            "output": {"enabled": args.output_processing},
        },
        "serve_bench config",
    )
    engine_cls = FAKE_ENGINE if args.engine == "fake" else None
    options = {"tokens_per_s": 100.0, "repeat": True} if args.engine == "fake" else None
    log(f"starting the app ({args.engine} engine, tp_size={args.tp_size}) ...")
    serve.run(
        build_app(config, engine_cls=engine_cls, engine_options=options),
        name="bench",
        route_prefix="/bench",
    )
    return f"http://127.0.0.1:{port}/bench", temp_dir


def stop_server(temp_dir: str | None) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(report: dict[str, Any]) -> None:
    goodput = report.get("goodput") or {}
    if goodput.get("objectives_ms"):
        alone = goodput.get("single_stream_median_ms")
        basis = (f" (3x... of one request alone: TTFT {alone['ttft']:.0f} ms, TPOT {alone['tpot']:.1f} ms)"
                 if alone else "")
        print(f"goodput objectives: {goodput['objectives_ms']}{basis.replace('3x...', goodput['spec'])}")
    print(
        f"\n{'rate':>6}{'conc':>6}{'ok':>6}{'err%':>6}{'req/s':>7}{'tok/s':>7}"
        f"{'TTFT p50/p90/p99 ms':>22}{'ITL p50/p90/p99 ms':>21}{'TPOT p50':>9}{'E2E p50':>9}"
        f"{'goodput':>9}"
    )
    for r in report["rates"]:
        t, i = r["ttft_ms"], r["itl_ms"]
        print(
            f"{r['request_rate']!s:>6}{r['max_concurrency'] or '-'!s:>6}{r['completed']:>6}"
            f"{100 * r['error_rate']:>6.1f}{r['request_throughput']:>7.2f}"
            f"{r['output_tokens_per_s']:>7.0f}"
            f"{'/'.join(_fmt(t[f'p{p}']) for p in PERCENTILES):>22}"
            f"{'/'.join(_fmt(i[f'p{p}']) for p in PERCENTILES):>21}"
            f"{_fmt(r['tpot_ms']['p50']):>9}{_fmt(r['e2el_ms']['p50']):>9}"
            f"{r['goodput_req_per_s']:>9.2f}"
        )


def plot(report: dict[str, Any], path: Path) -> bool:
    """The PNG of latency against request rate; False when there is nothing to plot (no
    finite rate, as with ``--rates inf``) or no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return False
    rows = [r for r in report["rates"] if r["request_rate"] != "inf" and r["completed"]]
    if not rows:
        return False
    x = [r["request_rate"] for r in rows]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in ((left, "ttft_ms", "TTFT"), (mid, "itl_ms", "inter-token latency")):
        for p in PERCENTILES:
            ax.plot(x, [r[key][f"p{p}"] for r in rows], marker="o", label=f"p{p}")
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("offered request rate (req/s)")
        ax.legend()
    right.plot(x, [r["output_tokens_per_s"] for r in rows], marker="o", label="output tokens/s")
    right.plot(x, [r["e2el_ms"]["p50"] for r in rows], marker="s", label="E2E p50 (ms)")
    right.set_xlabel("offered request rate (req/s)")
    right.set_title("throughput and end-to-end latency")
    right.legend()
    fig.suptitle(
        f"M-AI serving benchmark: {report['engine']} engine ({report['model']}), "
        f"{report['num_prompts']} requests per rate, {report['cpu_cores']} CPU cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_rates(spec: str) -> list[float]:
    rates = [float(r) for r in spec.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates {spec!r}: give positive numbers (or inf), e.g. 2,8,16")
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG is written next to it)")
    ap.add_argument("--rates", default="2,8,16", help="request rates per second; inf: all at once")
    ap.add_argument("--num-prompts", type=int, default=80, help="requests per rate")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    ap.add_argument("--prompt-words", type=int, default=40, help="median words per user turn")
    ap.add_argument("--output-tokens", type=int, default=48, help="median max_tokens")
    ap.add_argument("--goodput", default=DEFAULT_GOODPUT, help="objectives NAME:MS, NAME in ttft, tpot, e2el")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout-s", type=float, default=180.0, help="per request")
    ap.add_argument("--engine", choices=("real", "fake"), default="real")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument(
        "--no-output-processing",
        dest="output_processing",
        action="store_false",
        help="turn the ingress's output pipeline off (on by default, as deployed)",
    )
    ap.add_argument("--url", default=None, help="benchmark this running server instead (base URL)")
    args = ap.parse_args()
    rates = parse_rates(args.rates)
    factor = auto_factor(args.goodput)
    objectives = parse_goodput(args.goodput) if factor is None else {}
    single: dict[str, float] | None = None
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be at least 1")

    bodies = chat_workload(args.num_prompts, args.seed, args.prompt_words, args.output_tokens)
    temp_dir = None
    figures = []
    try:
        url = args.url
        if url is None:
            url, temp_dir = start_server(args)
        log("warm-up: 4 requests ...")
        asyncio.run(run_rate(url, bodies[:4], math.inf, None, args.seed, args.request_timeout_s))
        if factor is not None:
            log(f"single stream: {SINGLE_STREAM_REQUESTS} requests one at a time ...")
            alone, _ = asyncio.run(run_rate(url, bodies[:SINGLE_STREAM_REQUESTS], math.inf, 1,
                                            args.seed, args.request_timeout_s))
            objectives, single = single_stream_objectives(alone, factor)
            log(f"  median TTFT {single['ttft']:.0f} ms, TPOT {single['tpot']:.1f} ms: goodput objectives "
                f"{', '.join(f'{k} <= {v:g} ms' for k, v in objectives.items())}")
        for rate in rates:
            log(f"rate {rate:g} req/s, {len(bodies)} requests ...")
            results, wall = asyncio.run(
                run_rate(url, bodies, rate, args.max_concurrency, args.seed, args.request_timeout_s)
            )
            figures.append(rate_figures(rate, args.max_concurrency, results, wall, objectives))
            log(f"  {figures[-1]['output_tokens_per_s']:.0f} tokens/s, {figures[-1]['error_rate']:.2%} errors")
    finally:
        if args.url is None:
            stop_server(temp_dir)
    report = {
        "model": MODEL,
        "engine": args.engine if args.url is None else "external",
        "tp_size": args.tp_size,
        "max_num_seqs": args.max_num_seqs,
        "output_processing": args.output_processing,
        "max_concurrency": args.max_concurrency,
        "cpu_cores": os.cpu_count(),
        "num_prompts": args.num_prompts,
        "workload": {"kind": "synthetic chat (see the module docstring)", "seed": args.seed,
                     "prompt_words_median": args.prompt_words, "output_tokens_median": args.output_tokens},
        "goodput": {"spec": args.goodput, "objectives_ms": objectives,
                    "single_stream_median_ms": single},
        "rates": figures,
    }
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    log(f"wrote {out}" + (f" and {png}" if plot(report, png) else " (no finite rate: no plot)"))


if __name__ == "__main__":
    main()
