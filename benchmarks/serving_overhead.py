"""What the serving layer costs: HTTP SSE and the Python handle against the engine alone.

One run, one engine configuration, the same prompts and sampling on every path:

- ``engine``: the engine driven directly in this process (``engine.generate``), no Ray;
- ``handle``: ``serve.get_app_handle(...).options(stream=True).chat_stream.remote(request)``
  from this process (ingress -> LLMServer -> rank actor -> engine);
- ``http``: ``POST /v1/chat/completions`` with ``stream=true`` through Serve's HTTP proxy,
  read as Server-Sent Events (proxy -> ingress -> LLMServer -> rank actor -> engine).

At 1 and 32 concurrent streams (a client keeps that many requests in flight) it reports output
tokens/s (all tokens / wall time) and time to first token (request sent -> first text). At 1
stream every request asks for 16 tokens; at 32 streams the lengths spread over 64-192 tokens,
so that streams end at different times as real answers do. Paths alternate in rounds, so that
a change in the machine's load hits them alike; the JSON records the load average.

``--engine real`` (default): the tiny model on the CPU (TP=1, one thread), the engine the
figures are claimed for; on a small machine its forward passes compete with Ray's processes
for the same cores (and rank 0's event loop for its GIL), which a GPU deployment does not
have. ``--engine fake``: ``engine.fake_engine.FakeEngine`` paced at ``--tokens-per-s`` per
stream after a ``--prefill-ms`` first-token delay (a Llama-2-7B-class decode on a GPU), one
token per byte: it takes next to no CPU, and its pace bounds what any path can reach, so a
ratio near 1 there says little about the serving layer under a real engine. The ingress's output pipeline is
off unless ``--output-processing`` (benchmarks/output_overhead.py measures it).

``python benchmarks/serving_overhead.py --out F`` writes JSON with ``http_tokens_per_s_ratio``
(HTTP over engine, 32 streams) and ``ttft_overhead_ms_p50`` (HTTP minus engine, 1 stream),
and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import ModelConfig, build_app_config  # noqa: E402

TARGETS = {"http_tokens_per_s_ratio": 0.90, "ttft_overhead_ms_p50": 15.0}
PATHS = ("engine", "handle", "http")
MODEL = "m-ai-tiny"
TOPICS = ["llamas", "the sea", "bread", "rain", "trains", "chess", "tea", "bees", "maps", "ice"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct one-turn chats (the same list on every path)."""
    return [
        [{"role": "user", "content": f"Tell me something about {TOPICS[i % len(TOPICS)]} ({i})."}]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_clients(requests: list[Any], concurrency: int, one) -> dict[str, Any]:
    """Keep ``concurrency`` requests in flight; ``one(request)`` returns (ttft_s, tokens)."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[tuple[float, int]] = []

    async def client() -> None:
        while not queue.empty():
            results.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttfts_ms": [1000 * t for t, _ in results],
    }


# -- the three paths ------------------------------------------------------------------------


class EnginePath:
    """The engine in this process, fed what LLMServer would feed it."""

    def __init__(self, engine: Any, config: ModelConfig) -> None:
        self.engine = engine
        self.config = config

    async def one(self, request: Any) -> tuple[float, int]:
        from deployments.ingress.openai_api import inputs as oa

        start = time.perf_counter()
        prompt = oa.chat_prompt(self.engine.tokenizer, request, self.config)
        params = oa.sampling_params(request, self.config, len(prompt.token_ids), "messages")
        ttft, tokens = None, 0
        async for out in self.engine.generate(prompt.token_ids, params):
            tokens += len(out.token_ids)
            if ttft is None and out.text:
                ttft = time.perf_counter() - start
        return ttft, tokens


class HandlePath:
    def __init__(self, app_name: str) -> None:
        from ray import serve

        self.handle = serve.get_app_handle(app_name).options(stream=True)

    async def one(self, request: Any) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, tokens = None, 0
        async for chunk in self.handle.chat_stream.remote(request):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return ttft, tokens


class HttpPath:
    def __init__(self, url: str, concurrency: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=120)

    async def one(self, request: Any) -> tuple[float, int]:
        body = request.model_dump(mode="json", exclude_none=True)
        start = time.perf_counter()
        ttft, tokens = None, 0
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream failed: {chunk['error']}")
                choices = chunk.get("choices") or []
                if ttft is None and choices and choices[0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return ttft, tokens

    async def close(self) -> None:
        await self.client.aclose()


# -- set-up -----------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, checkpoint: str | None) -> ModelConfig:
    return ModelConfig(
        model_size="tiny",
        checkpoint=checkpoint,
        device="cpu",
        dtype="float32",
        tp_size=1,
        max_num_seqs=32,
        context_length=1024,
        max_tokens=args.max_tokens,
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.engine == "real":
        return None
    # One token per byte: the fake engine's own detokenizing then costs next to nothing, so the
    # rank 0's CPU is the serving layer's (the tiny tokenizer re-decodes each whole answer).
    return {
        "tokens_per_s": args.tokens_per_s,
        "first_token_delay_s": args.prefill_ms / 1000,
        "repeat": True,
        "tokenizer": "bytes",
    }


def start_serve(args: argparse.Namespace, config: ModelConfig) -> tuple[str, str, str]:
    """Local Ray (own temp dir, no dashboard) + Serve on a free port + the app; (name, url, dir)."""
    import socket

    from ray import serve

    from deployments.app import FAKE_ENGINE, build_app
    from deployments.cli.main import start_local_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    temp_dir = start_local_ray(8, log_to_driver=False)  # as `m-ai serve` starts it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_config = build_app_config(
        {
            "models": [config.model_dump(exclude_none=True)],
            "serving": {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.1},
            "output": {"enabled": args.output_processing},
        },
        "benchmark config",
    )
    engine_cls = FAKE_ENGINE if args.engine == "fake" else None
    app = build_app(app_config, engine_cls=engine_cls, engine_options=engine_options(args))
    serve.run(app, name="bench", route_prefix="/bench")
    return "bench", f"http://127.0.0.1:{port}/bench", temp_dir


def make_engine(args: argparse.Namespace, config: ModelConfig) -> Any:
    if args.engine == "fake":
        from engine.fake_engine import FakeEngine

        return FakeEngine.from_config(config, **engine_options(args))
    from engine.engine import LLMEngine

    return LLMEngine.from_config(config)


def output_lengths(n: int, mean: int, spread: bool) -> list[int]:
    """``max_tokens`` of each request: ``mean`` for all, or spread evenly over [mean/2, 3*mean/2]
    in a fixed shuffled order, so that concurrent streams end at different times as real
    answers do (equal lengths would restart all 32 streams at once, in waves)."""
    if not spread:
        return [mean] * n
    low, width = mean - mean // 2, 2 * (mean // 2) + 1
    return [low + (i * 53) % width for i in range(n)]


async def measure(args: argparse.Namespace, engine: Any, config: ModelConfig, url: str) -> dict:
    """Every path at each concurrency, in ``args.rounds`` interleaved rounds (engine, handle,
    http, engine, ...) so that a change in the machine's load hits all paths alike."""
    from deployments.protocol import ChatCompletionRequest

    def requests(chats: list, lengths: list[int]) -> list[ChatCompletionRequest]:
        return [
            ChatCompletionRequest(
                model=MODEL,
                messages=m,
                max_tokens=n,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for m, n in zip(chats, lengths)
        ]

    results: dict[str, dict[int, dict]] = {p: {} for p in PATHS}
    for concurrency, n, mean, spread in (
        (1, args.requests_1, args.tokens_1, False),
        (32, args.requests_32, args.max_tokens, True),
    ):
        chats, lengths = prompts(n), output_lengths(n, mean, spread)
        http = HttpPath(url, concurrency)
        paths = {"engine": EnginePath(engine, config), "handle": HandlePath("bench"), "http": http}
        rounds: dict[str, list[dict]] = {p: [] for p in PATHS}
        try:
            for name in PATHS:  # warm-up: connections, code paths, the engine's first steps
                warm = requests(prompts(concurrency), [4] * concurrency)
                await run_clients(warm, concurrency, paths[name].one)
            for r in range(args.rounds):
                part = slice(r * n // args.rounds, (r + 1) * n // args.rounds)
                for name in PATHS:
                    log(f"{name}: round {r + 1}/{args.rounds}, {concurrency} in flight ...")
                    batch = requests(chats[part], lengths[part])
                    rounds[name].append(await run_clients(batch, concurrency, paths[name].one))
        finally:
            await http.close()
        for name in PATHS:
            results[name][concurrency] = merge_rounds(rounds[name])
        expected = results["engine"][concurrency]["tokens"]
        for name in ("handle", "http"):  # same requests, greedy: the same tokens
            got = results[name][concurrency]["tokens"]
            if got != expected:
                log(f"warning: {name} at {concurrency} streams got {got} tokens, engine {expected}")
    return results


def merge_rounds(rounds: list[dict]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    ttfts = [t for r in rounds for t in r["ttfts_ms"]]
    return {
        "requests": sum(r["requests"] for r in rounds),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p90": percentile(ttfts, 0.9),
        "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds],
    }


def summarize(args: argparse.Namespace, results: dict) -> dict[str, Any]:
    r: dict[str, Any] = {
        "engine": args.engine,
        "fake_tokens_per_s_per_stream": args.tokens_per_s if args.engine == "fake" else None,
        "fake_prefill_ms": args.prefill_ms if args.engine == "fake" else None,
        "output_processing": args.output_processing,
        "cpu_cores": os.cpu_count(),
        # Serve settings of the cluster's processes (deployments.app.SERVE_CLUSTER_ENV; the
        # replicas' own come from serving.replica_event_loop)
        "serve_cluster_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        # Other work on the machine slows Ray's processes (not the fake engine): record it.
        "load_average_1m": {"start": args.load_start, "end": os.getloadavg()[0]},
        "results": results,
    }
    for c in (1, 32):
        base = results["engine"][c]
        for path in ("handle", "http"):
            r[f"{path}_tokens_per_s_ratio_{c}"] = (
                results[path][c]["tokens_per_s"] / base["tokens_per_s"]
            )
            r[f"{path}_ttft_overhead_ms_p50_{c}"] = (
                results[path][c]["ttft_ms_p50"] - base["ttft_ms_p50"]
            )
    r["http_tokens_per_s_ratio"] = r["http_tokens_per_s_ratio_32"]
    r["ttft_overhead_ms_p50"] = r["http_ttft_overhead_ms_p50_1"]
    r["targets"] = TARGETS
    r["targets_met"] = {
        "http_tokens_per_s_ratio": r["http_tokens_per_s_ratio"]
        >= TARGETS["http_tokens_per_s_ratio"],
        "ttft_overhead_ms_p50": r["ttft_overhead_ms_p50"] < TARGETS["ttft_overhead_ms_p50"],
    }
    return r


def print_table(r: dict) -> None:
    res = r["results"]
    print(
        f"\n{'path':8}{'streams':>8}{'tokens/s':>10}{'x engine':>10}{'TTFT p50 ms':>13}"
        f"{'+ms':>8}{'TTFT p90 ms':>13}"
    )
    for c in (1, 32):
        base = res["engine"][c]
        for path in PATHS:
            x = res[path][c]
            print(
                f"{path:8}{c:8d}{x['tokens_per_s']:10.0f}{x['tokens_per_s'] / base['tokens_per_s']:10.3f}"
                f"{x['ttft_ms_p50']:13.1f}{x['ttft_ms_p50'] - base['ttft_ms_p50']:8.1f}"
                f"{x['ttft_ms_p90']:13.1f}"
            )
    load = r["load_average_1m"]
    print(
        f"\n{r['cpu_cores']} cores; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end"
    )
    for key, target in r["targets"].items():
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG is written next to it)")
    ap.add_argument("--engine", choices=("fake", "real"), default="real")
    ap.add_argument("--tokens-per-s", type=float, default=40.0, help="fake engine: pace per stream")
    ap.add_argument("--prefill-ms", type=float, default=20.0, help="fake engine: first-token delay")
    ap.add_argument(
        "--output-processing",
        action="store_true",
        help="keep the ingress's output pipeline on (it holds text back to safe boundaries; "
        "benchmarks/output_overhead.py measures it): off by default, this measures transport",
    )
    ap.add_argument("--requests-1", type=int, default=60, help="requests at 1 stream")
    ap.add_argument("--tokens-1", type=int, default=16, help="max_tokens at 1 stream")
    ap.add_argument("--requests-32", type=int, default=192, help="requests at 32 streams")
    ap.add_argument(
        "--max-tokens", type=int, default=128, help="mean max_tokens at 32 streams (64..192)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    args = ap.parse_args()
    args.load_start = os.getloadavg()[0]

    from engine.tiny.checkpoint import ensure_tiny_checkpoint

    checkpoint = str(ensure_tiny_checkpoint())
    config = model_config(args, checkpoint)
    if args.engine == "real":
        import torch

        torch.set_num_threads(1)
    temp_dir = None
    engine = None
    try:
        _, url, temp_dir = start_serve(args, config)
        engine = make_engine(args, config)
        results = asyncio.run(measure(args, engine, config, url))
    finally:
        if engine is not None:
            engine.shutdown()
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    r = summarize(args, results)
    print_table(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    plot(r, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
