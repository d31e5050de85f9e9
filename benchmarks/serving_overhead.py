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
and a PNG next to it. With each path it records the CPU seconds each process spent per 1,000
output tokens (``benchmarks/process_cpu.py``: the proxy, the ingress and LLMServer replicas,
rank 0's engine thread and its other threads, the client) and the SSE events per 1,000 tokens:
figures that other work on the machine changes less than tokens/s. ``--paths`` and
``--streams`` pick a part (e.g. ``--paths engine,http --streams 32``); ``--pids-file`` names the
processes for a profiler.
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

from benchmarks.process_cpu import ProcessCpu, cpu_delta, cpu_per_1k_tokens  # noqa: E402
from benchmarks.serving_overhead_report import PATHS, TARGETS, plot, print_table  # noqa: E402
from cluster.config import ModelConfig, build_app_config  # noqa: E402

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
            # counted as the API's usage counts them: an end-of-sequence token is generated
            # (completion_tokens) but not sent (token_ids)
            tokens = out.completion_tokens or tokens + len(out.token_ids)
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
        self.events = 0  # SSE events read, all requests

    async def one(self, request: Any) -> tuple[float, int]:
        """One streamed request, read as raw SSE bytes: an event's JSON is parsed only while
        the first text is awaited, for the usage and for an error, so that the client's own
        CPU (it shares the cores with the server) stays small."""
        body = request.model_dump(mode="json", exclude_none=True)
        start = time.perf_counter()
        ttft, tokens, buffer = None, 0, b""
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for data in response.aiter_raw():
                *events, buffer = (buffer + data).split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue  # [DONE]
                    self.events += 1
                    if ttft is not None and b'"usage":{' not in event and b'{"error"' not in event[:16]:
                        continue
                    chunk = json.loads(event[6:])
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
    from deployments.cli.main import proxy_port, start_local_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_config = build_app_config(
        {
            "models": [config.model_dump(exclude_none=True)],
            "serving": {
                "port": port,
                "direct_ingress": args.direct_ingress,
                "rank_channel": args.rank_channel,
                "rank_niceness": args.rank_niceness,
                "graceful_shutdown_timeout_s": 1,
                "graceful_shutdown_wait_loop_s": 0.1,
                **({"stream_max_events_per_s": args.max_events_per_s} if args.max_events_per_s else {}),
            },
            "output": {"enabled": args.output_processing},
        },
        "benchmark config",
    )
    # as `m-ai serve` starts them
    temp_dir = start_local_ray(8, log_to_driver=False, serving=app_config.serving)
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port(app_config.serving)})
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


async def measure(
    args: argparse.Namespace, engine: Any, config: ModelConfig, url: str, cpu: ProcessCpu
) -> tuple[dict, dict]:
    """Every path of ``args.paths`` at each of ``args.streams``, in ``args.rounds`` interleaved
    rounds (engine, handle, http, engine, ...) so that a change in the machine's load hits all
    paths alike; with each round's tokens, the CPU seconds each process spent on it."""
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

    paths = args.paths
    results: dict[str, dict[int, dict]] = {p: {} for p in paths}
    cpu_s: dict[str, dict[int, dict[str, float]]] = {p: {} for p in paths}
    settings = {1: (args.requests_1, args.tokens_1, False), 32: (args.requests_32, args.max_tokens, True)}
    for concurrency in args.streams:
        n, mean, spread = settings[concurrency]
        chats, lengths = prompts(n), output_lengths(n, mean, spread)
        http = HttpPath(url, concurrency)
        runners = {
            "engine": EnginePath(engine, config) if engine is not None else None,
            "handle": HandlePath("bench") if "handle" in paths else None,
            "http": http,
        }
        rounds: dict[str, list[dict]] = {p: [] for p in paths}
        try:
            for name in paths:  # warm-up: connections, code paths, the engine's first steps
                warm = requests(prompts(concurrency), [4] * concurrency)
                await run_clients(warm, concurrency, runners[name].one)
            for r in range(args.rounds):
                part = slice(r * n // args.rounds, (r + 1) * n // args.rounds)
                for name in paths:
                    log(f"{name}: round {r + 1}/{args.rounds}, {concurrency} in flight ...")
                    batch = requests(chats[part], lengths[part])
                    before, events = cpu.snapshot(), http.events
                    rounds[name].append(await run_clients(batch, concurrency, runners[name].one))
                    rounds[name][-1]["events"] = http.events - events
                    spent = cpu_delta(before, cpu.snapshot())
                    total = cpu_s[name].setdefault(concurrency, {})
                    for role, seconds in spent.items():
                        total[role] = total.get(role, 0.0) + seconds
        finally:
            await http.close()
        for name in paths:
            results[name][concurrency] = merge_rounds(rounds[name])
        expected = results[paths[0]][concurrency]["tokens"]
        for name in paths[1:]:  # same requests, greedy: the same tokens
            got = results[name][concurrency]["tokens"]
            if got != expected:
                log(f"warning: {name} at {concurrency} streams got {got} tokens, {paths[0]} {expected}")
    return results, cpu_s


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
        "events_per_1k_tokens": 1000 * sum(r["events"] for r in rounds) / tokens,
    }


def summarize(args: argparse.Namespace, results: dict, cpu_s: dict) -> dict[str, Any]:
    r: dict[str, Any] = {
        "engine": args.engine,
        "fake_tokens_per_s_per_stream": args.tokens_per_s if args.engine == "fake" else None,
        "fake_prefill_ms": args.prefill_ms if args.engine == "fake" else None,
        "output_processing": args.output_processing,
        "cpu_cores": os.cpu_count(),
        "direct_ingress": args.direct_ingress,
        "rank_channel": args.rank_channel,
        "rank_niceness": args.rank_niceness,
        # Serve settings of the cluster's processes (deployments.app.SERVE_CLUSTER_ENV; the
        # replicas' own come from serving.replica_event_loop)
        "serve_cluster_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        # Other work on the machine slows Ray's processes (not the fake engine): record it.
        "load_average_1m": {"start": args.load_start, "end": os.getloadavg()[0]},
        "results": results,
        "cpu_s_per_1k_tokens": cpu_per_1k_tokens(results, cpu_s),
    }
    if "engine" not in results:
        return r
    for c in args.streams:
        base = results["engine"][c]
        for path in set(results) & {"handle", "http"}:
            r[f"{path}_tokens_per_s_ratio_{c}"] = (
                results[path][c]["tokens_per_s"] / base["tokens_per_s"]
            )
            r[f"{path}_ttft_overhead_ms_p50_{c}"] = (
                results[path][c]["ttft_ms_p50"] - base["ttft_ms_p50"]
            )
    targets = {
        "http_tokens_per_s_ratio": "http_tokens_per_s_ratio_32",
        "ttft_overhead_ms_p50": "http_ttft_overhead_ms_p50_1",
    }
    for key, source in targets.items():
        if source in r:
            r[key] = r[source]
    r["targets"] = {k: v for k, v in TARGETS.items() if k in r}
    r["targets_met"] = {
        key: r[key] >= target if key.endswith("ratio") else r[key] < target
        for key, target in r["targets"].items()
    }
    return r


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
    ap.add_argument(
        "--paths", type=comma_list(PATHS), default=list(PATHS), help="e.g. engine,http (all)"
    )
    ap.add_argument(
        "--streams", type=comma_list(("1", "32")), default=["1", "32"], help="1, 32 or 1,32"
    )
    ap.add_argument(
        "--max-events-per-s", type=float, help="serving.stream_max_events_per_s (its default)"
    )
    ap.add_argument(
        "--direct-ingress",
        action="store_true",
        help="serving.direct_ingress: the ingress replica serves HTTP itself, no proxy hop",
    )
    ap.add_argument(
        "--rank-channel", choices=("socket", "ray"), default="socket",
        help="serving.rank_channel: how a model replica reaches its rank 0 (its default: socket)",
    )
    ap.add_argument(
        "--rank-niceness", type=int, default=0,
        help="serving.rank_niceness: the rank processes' scheduling niceness (its default: 0; "
        "Ray's own: 15)",
    )
    ap.add_argument(
        "--pids-file", help="write the processes' ids by role here once Serve runs (a profiler's)"
    )
    args = ap.parse_args()
    args.streams = [int(c) for c in args.streams]
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
        engine = make_engine(args, config) if "engine" in args.paths else None
        core = getattr(engine, "core", None)
        cpu = ProcessCpu(temp_dir, core._thread.native_id if core is not None else None)
        if args.pids_file:
            Path(args.pids_file).write_text(json.dumps(cpu.pids()))
        results, cpu_s = asyncio.run(measure(args, engine, config, url, cpu))
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
    r = summarize(args, results, cpu_s)
    print_table(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    if set(args.paths) == set(PATHS) and args.streams == [1, 32]:
        plot(r, out.with_suffix(".png"))


def comma_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated subset of ``choices``, in their order."""

    def parse(text: str) -> list[str]:
        picked = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in picked if t not in choices]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"{text!r}: pick from {', '.join(choices)}")
        return [c for c in choices if c in picked]

    return parse


if __name__ == "__main__":
    main()
