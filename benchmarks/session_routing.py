"""Session turns across two model replicas: does a session's next turn find its blocks?

The paged engine's prefix cache makes a session's turn 10 cheap on the replica that served
turns 1-9 (``benchmarks/kv_capacity.py``: ``session_ttft_speedup`` through one engine). With two
replicas behind Serve, that depends on routing: with ``serving.session_affinity`` the ingress
names the session on its call and the model deployment's router sends it to the session's
replica (``deployments/llm_server/routing.py``); without it Serve picks the less loaded of two
replicas, the session's own one about half of the time.

One local app through HTTP (the real tiny engine, 2 replicas of tensor-parallel size 1, one
torch thread each; memory off so the prompt is the session's history and nothing else):
``--sessions`` concurrent sessions (``POST /v1/sessions``) of ``--turns`` streamed turns each
(24 new words per user message, 16 greedy answer tokens). Time to first token of the last turn
(median over sessions), against the same last-turn prompts sent as plain messages (no session)
to the same app redeployed with prefix caching off: cold prompts of the same lengths through
the same path. Both with affinity on and off, alternating, ``--rounds`` times each:

    session_ttft_speedup_2_replicas = cold / warm, affinity on (target >= 4)
    session_ttft_speedup_2_replicas_no_affinity = cold / warm, affinity off

Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "m-ai-tiny"
WORDS = ("river", "lamp", "garden", "copper", "winter", "violin", "harbor", "pepper", "signal", "meadow",
         "canyon", "marble", "orchard", "lantern", "thunder", "velvet", "compass", "saddle", "glacier", "ember")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def deploy(port: int, affinity: bool, prefix_caching: bool, state: str) -> str:
    from ray import serve

    from cluster.config import build_app_config
    from deployments.app import build_app

    config = build_app_config({
        "models": [{"temperature": 0.0, "max_num_seqs": 32, "max_tokens": 16,
                    "enable_prefix_caching": prefix_caching, "cpu_threads_per_rank": 1}],
        "serving": {"session_state_uri": f"{state}/sessions", "min_replicas": 2, "max_replicas": 2,
                    "rank_num_cpus": 1.0, "replica_num_cpus": 0.1, "session_affinity": affinity,
                    "max_ongoing_requests": 64},
        "memory": {"enabled": False},
    }, "session routing benchmark")
    serve.run(build_app(config, engine_cls=None), name="routing", route_prefix="/routing")
    return f"http://127.0.0.1:{port}/routing"


async def ttft(client: httpx.AsyncClient, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():  # read to the end: the turn is stored after it
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream ended without content")
    return first


async def conversations(url: str, n: int, turns: int, seed: int) -> tuple[list[float], list[list[dict]]]:
    """``n`` sessions of ``turns`` turns, all sessions at once per turn; the last turn's TTFTs
    and each session's messages before its last turn plus that turn's user message."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        ids = [(await client.post("/v1/sessions", json={})).json()["id"] for _ in range(n)]
        last: list[float] = []
        prompts: list[list[dict]] = []
        for turn in range(turns):
            texts = [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in ids]
            if turn == turns - 1:
                for sid, text in zip(ids, texts):
                    history = (await client.get(f"/v1/sessions/{sid}")).json()["messages"]
                    prompts.append([{"role": m["role"], "content": m["content"]} for m in history]
                                   + [{"role": "user", "content": text}])
            bodies = [{"model": MODEL, "session_id": sid, "max_tokens": 16, "ignore_eos": True,
                       "messages": [{"role": "user", "content": text}]} for sid, text in zip(ids, texts)]
            times = await asyncio.gather(*(ttft(client, b) for b in bodies))
            log(f"    turn {turn + 1}/{turns}: median TTFT {1000 * statistics.median(times):.1f} ms")
            last = list(times)
        for sid in ids:
            await client.delete(f"/v1/sessions/{sid}")
    return last, prompts


def prefix_hit_rates(url: str) -> list[float]:
    """Each replica's prefix cache hit rate (``GET /metrics``, vLLM's gauge)."""
    import re

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [float(v) for v in re.findall(r"^vllm:prefix_cache_hit_rate\{[^}]*\} (\S+)$", text, re.M)]


async def cold(url: str, prompts: list[list[dict]]) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        bodies = [{"model": MODEL, "max_tokens": 16, "ignore_eos": True, "messages": p} for p in prompts]
        return list(await asyncio.gather(*(ttft(client, b) for b in bodies)))


def wait_ready(url: str) -> None:
    for _ in range(600):
        try:
            if httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                          ).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the app did not answer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side (affinity on, off), alternating")
    args = ap.parse_args()

    import socket
    import tempfile

    from ray import serve

    from deployments.cli.main import start_local_ray

    start_local_ray(6, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    state = tempfile.mkdtemp(prefix="m-ai-routing-")
    runs: dict[str, list[dict[str, float]]] = {"affinity": [], "no_affinity": []}
    for round_ in range(args.rounds):
        for side, affinity in (("affinity", True), ("no_affinity", False)):
            log(f"round {round_ + 1}/{args.rounds}, {side}: {args.sessions} sessions x {args.turns} turns ...")
            url = deploy(port, affinity, True, state)
            wait_ready(url)
            warm, prompts = asyncio.run(conversations(url, args.sessions, args.turns, seed=round_))
            hits = prefix_hit_rates(url)
            log(f"  {side}: cold prompts, prefix caching off ...")
            url = deploy(port, affinity, False, state)
            wait_ready(url)
            cold_times = asyncio.run(cold(url, prompts))
            w, c = statistics.median(warm), statistics.median(cold_times)
            runs[side].append({"warm_ttft_ms": 1000 * w, "cold_ttft_ms": 1000 * c, "speedup": c / w,
                               "prefix_cache_hit_rate_per_replica": hits})
            log(f"  {side}: warm {1000 * w:.1f} ms, cold {1000 * c:.1f} ms, speedup {c / w:.2f}, "
                f"prefix cache hit rate per replica {[round(h, 3) for h in hits]}")
    serve.shutdown()
    on = statistics.median(r["speedup"] for r in runs["affinity"])
    off = statistics.median(r["speedup"] for r in runs["no_affinity"])
    result = {"sessions": args.sessions, "turns": args.turns, "rounds": args.rounds, "replicas": 2,
              "runs": runs, "session_ttft_speedup_2_replicas": on,
              "session_ttft_speedup_2_replicas_no_affinity": off,
              "targets": {"session_ttft_speedup_2_replicas": 4.0}, "load_average": os.getloadavg()}
    print(f"session_ttft_speedup_2_replicas              {on:.2f}  (target 4.0, {'met' if on >= 4 else 'MISSED'})")
    print(f"session_ttft_speedup_2_replicas_no_affinity  {off:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
