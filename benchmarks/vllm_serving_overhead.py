"""What vLLM's own HTTP server costs on this machine: the peer's figure for serving_overhead.py.

``benchmarks/serving_overhead.py`` measures M-AI's HTTP path against its engine alone. This
measures the same thing for vLLM's CPU build, on the same machine, checkpoint and workload, so
that M-AI's ratio can be read against what a peer's serving layer costs on the same cores:

- ``engine``: vLLM's ``AsyncLLM`` driven in a process of its own (its engine core runs in a
  second process, as vLLM always runs it), 32 requests in flight;
- ``http``: ``vllm serve`` (its OpenAI server, default settings: an event per token), read as
  Server-Sent Events from ``POST /v1/completions`` with ``stream=true``, 32 in flight.

The workload is serving_overhead.py's at 32 streams: 192 one-line prompts, greedy,
``max_tokens`` spread over 64-192 with ``ignore_eos`` so that every path generates the same
tokens. vLLM's compute thread is bound to core 0 (``VLLM_CPU_OMP_THREADS_BIND=0``, one thread:
M-AI's engine in serving_overhead.py has one) and its KV cache is 2 GiB. Both vLLM processes
stay up for the whole run and the paths alternate in rounds (engine, http, engine, ...), so a
change in the machine's load hits both alike; start-up is not timed.

``python benchmarks/vllm_serving_overhead.py --out F`` writes JSON with
``vllm_http_tokens_per_s_ratio`` (HTTP over engine, medians of the rounds) and the time to
first token of each path. vLLM comes from its own virtual environment (``make bench-peers``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = REPO / ".cache" / "peers" / "vllm" / "bin" / "python"
TOPICS = ["llamas", "the sea", "bread", "rain", "trains", "chess", "tea", "bees", "maps", "ice"]
STREAMS = 32


def workload(n: int, mean: int) -> list[tuple[str, int]]:
    """serving_overhead.py's prompts and spread output lengths (64..192 for a mean of 128)."""
    low, width = mean - mean // 2, 2 * (mean // 2) + 1
    return [(f"Tell me something about {TOPICS[i % len(TOPICS)]} ({i}).", low + (i * 53) % width)
            for i in range(n)]


async def run_clients(items: list, one) -> dict:
    """Keep ``STREAMS`` requests in flight; ``one(item)`` returns (ttft_s, tokens)."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    results: list[tuple[float, int]] = []

    async def client() -> None:
        while not queue.empty():
            results.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(STREAMS)))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    ttfts = sorted(1000 * t for t, _ in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms_p50": ttfts[len(ttfts) // 2]}


# -- the engine path: a worker in vLLM's environment, one round per line on stdin ------------


def engine_worker(model_dir: str, n: int, mean: int) -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main() -> None:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model_dir, tokenizer=model_dir, dtype="float32", max_num_seqs=STREAMS, max_model_len=1024,
            enable_prefix_caching=False, seed=0, disable_log_stats=True))
        counter = iter(range(10**9))

        async def one(item: tuple[str, int]) -> tuple[float, int]:
            prompt, n_tokens = item
            params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            start, ttft, tokens = time.perf_counter(), None, 0
            async for out in engine.generate(prompt, params, f"r{next(counter)}"):
                tokens += len(out.outputs[0].token_ids)
                if ttft is None and out.outputs[0].text:
                    ttft = time.perf_counter() - start
            return ttft if ttft is not None else time.perf_counter() - start, tokens

        await run_clients(workload(8, 16), one)  # warm-up
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "round":
            print(json.dumps(await run_clients(workload(n, mean), one)), flush=True)
        engine.shutdown()

    asyncio.run(main())


# -- the HTTP path: vLLM's OpenAI server -------------------------------------------------------


async def http_round(url: str, model_dir: str, n: int, mean: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def one(item: tuple[str, int]) -> tuple[float, int]:
            prompt, n_tokens = item
            body = {"model": model_dir, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start, ttft, tokens, buffer = time.perf_counter(), None, 0, b""
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for data in response.aiter_raw():
                    *events, buffer = (buffer + data).split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: {"):
                            continue
                        if ttft is not None and b'"usage":{' not in event:
                            continue  # parse only what is needed: the client shares the cores
                        chunk = json.loads(event[6:])
                        if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                            ttft = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            return ttft if ttft is not None else time.perf_counter() - start, tokens

        return await run_clients(workload(n, mean), one)


def end(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Wait for ``proc`` to exit (asked already), then kill it."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def worker_result(worker: subprocess.Popen) -> dict:
    """The engine worker's next JSON line (vLLM logs to the same stdout)."""
    while line := worker.stdout.readline():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the vLLM engine worker exited ({worker.poll()}) without a result")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not ready within {timeout_s:g} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file to write (required)")
    ap.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON),
                    help="python of the virtual environment with vllm-cpu (make bench-peers)")
    ap.add_argument("--requests", type=int, default=192, help="requests per round")
    ap.add_argument("--max-tokens", type=int, default=128, help="mean max_tokens (spread over 64..192)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds vLLM may take to start")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # the model directory: run the engine path
    args = ap.parse_args()
    if args.worker:
        engine_worker(args.worker, args.requests, args.max_tokens)
        return
    if not args.out:
        ap.error("--out is required")
    if not Path(args.vllm_python).exists():
        sys.exit(f"{args.vllm_python} does not exist: run `make bench-peers` or pass --vllm-python")
    sys.path.insert(0, str(REPO))
    from cluster.net import free_port
    from engine.tiny.checkpoint import ensure_tiny_checkpoint

    model_dir = str(ensure_tiny_checkpoint())
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_KVCACHE_SPACE="2")
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    log_dir = Path(args.out).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    server_log = open(log_dir / "vllm_serve.log", "w")
    server = subprocess.Popen(
        # the server's module: the `vllm` command reads the version of a distribution named
        # vllm, and the CPU build's is vllm-cpu
        [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-num-seqs", str(STREAMS), "--max-model-len", "1024", "--no-enable-prefix-caching",
         "--seed", "0", "--disable-log-stats"],
        env=env, stdout=server_log, stderr=subprocess.STDOUT)
    worker = subprocess.Popen([args.vllm_python, __file__, "--worker", model_dir, "--requests", str(args.requests),
                               "--max-tokens", str(args.max_tokens)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    r: dict = {"engine": "vllm-cpu", "requests": args.requests, "streams": STREAMS, "rounds": args.rounds,
               "load_average_start": os.getloadavg()[0], "results": {"engine": [], "http": []}}
    try:
        print("starting vLLM's server and engine ...", file=sys.stderr, flush=True)
        wait_ready(url, server, args.start_timeout)
        while (line := worker.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise RuntimeError("the vLLM engine worker exited before it was ready")
        asyncio.run(http_round(url, model_dir, 8, 16))  # warm-up
        for i in range(args.rounds):
            print(f"engine: round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            worker.stdin.write("round\n")
            worker.stdin.flush()
            r["results"]["engine"].append(worker_result(worker))
            print(f"http: round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            r["results"]["http"].append(asyncio.run(http_round(url, model_dir, args.requests, args.max_tokens)))
    finally:
        if worker.poll() is None:
            worker.stdin.close()  # the worker ends its loop and shuts its engine down
        end(worker)
        server.terminate()
        end(server)
        server_log.close()
    summary = {}
    for path, rounds in r["results"].items():
        summary[path] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds),
                         "ttft_ms_p50": statistics.median(x["ttft_ms_p50"] for x in rounds),
                         "tokens": [x["tokens"] for x in rounds]}
    r["summary"] = summary
    r["vllm_http_tokens_per_s_ratio"] = summary["http"]["tokens_per_s"] / summary["engine"]["tokens_per_s"]
    r["vllm_ttft_overhead_ms_p50"] = summary["http"]["ttft_ms_p50"] - summary["engine"]["ttft_ms_p50"]
    r["load_average_end"] = os.getloadavg()[0]
    print(f"\n{'path':8}{'tokens/s':>10}{'x engine':>10}{'TTFT p50 ms':>13}")
    for path, s in summary.items():
        ratio = s["tokens_per_s"] / summary["engine"]["tokens_per_s"]
        print(f"{path:8}{s['tokens_per_s']:10.0f}{ratio:10.3f}{s['ttft_ms_p50']:13.1f}")
    print(f"vllm_http_tokens_per_s_ratio  {r['vllm_http_tokens_per_s_ratio']:.3f}  (32 streams)")
    Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
