"""What the paged KV cache buys: more sequences in the same memory, and cheap session turns.

1. ``capacity_ratio``: the tiny model's engine with a KV pool of exactly the memory the
   contiguous layout gave ``--slots`` sequences (``slots x context`` tokens), and more
   requests than that waiting, with sequences (prompt and 16 output tokens) of a quarter of
   the context on average (uniform between an eighth and three eighths). The most sequences running at once, sampled after
   every engine step, divided by ``--slots`` (the contiguous layout's count at that memory,
   whatever the lengths).
2. ``session_ttft_speedup``: 32 concurrent conversations of 10 turns through one engine (one
   torch thread); each turn's prompt is the whole conversation so far plus a new user message,
   as a chat server builds it, so turn 10 finds the earlier turns' blocks in the prefix cache.
   Against it: the same 32 turn-10 prompts sent the same way (all at once) to an engine with
   prefix caching off, i.e. cold prompts of the same lengths. Median turn-10 time to first
   token, cold over warm. The KV memory the cached conversations hold is reported.

The same through the HTTP API with 2 replicas, where routing decides whether a session's
blocks are reused: ``benchmarks/session_routing.py``.

Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.catalog import architecture  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.tiny.checkpoint import ensure_tiny_checkpoint  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def capacity(path: Path, slots: int, context: int, requests: int) -> dict:
    block = 16
    config = ModelConfig(model_size="tiny", checkpoint=str(path), dtype="float32", device="cpu",
                         context_length=context, max_num_seqs=requests, max_batched_tokens=4096,
                         max_tokens=16, kv_block_size=block, kv_cache_blocks=slots * context // block,
                         enable_prefix_caching=False, kv_watermark=0.0)
    rng = random.Random(0)
    # prompt + 16 output tokens: a quarter of the context on average
    lengths = [rng.randint(context // 8, 3 * context // 8) - 16 for _ in range(requests)]
    prompts = [[1] + [rng.randrange(3, 4096) for _ in range(n - 1)] for n in lengths]
    most = 0
    with LLMEngine.from_config(config) as engine:
        sched = engine.core.scheduler
        streams = [engine.submit(p, SamplingParams(max_tokens=16, **GREEDY)) for p in prompts]
        done = threading.Event()

        def watch() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, sched.num_running)
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        for s in streams:
            s.result()
        done.set()
        watcher.join()
        preemptions = engine.stats().num_preemptions
    return {"slots_contiguous": slots, "context_length": context, "requests": requests,
            "mean_prompt_tokens": statistics.mean(lengths),
            "mean_sequence_tokens": statistics.mean(lengths) + 16, "kv_tokens": slots * context,
            "max_running_paged": most, "preemptions": preemptions, "capacity_ratio": most / slots}


def _ttfts(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[float], list[list[int]]]:
    streams = [engine.submit(p, SamplingParams(max_tokens=max_tokens, **GREEDY)) for p in prompts]
    outs = [s.result() for s in streams]
    return [o.first_token_time - o.arrival_time for o in outs], [o.token_ids for o in outs]


def sessions(path: Path, n_sessions: int, turns: int, user_tokens: int, answer_tokens: int) -> dict:
    rng = random.Random(1)
    base = dict(model_size="tiny", checkpoint=str(path), dtype="float32", device="cpu",
                context_length=2048, max_num_seqs=32, max_batched_tokens=2048, max_tokens=answer_tokens)
    system = [1] + [rng.randrange(3, 4096) for _ in range(31)]
    histories = [list(system) for _ in range(n_sessions)]
    per_turn: list[list[float]] = []
    with LLMEngine.from_config(ModelConfig(**base, enable_prefix_caching=True)) as warm:
        _ttfts(warm, [[1, 5, 6, 7]], 2)  # warm-up
        for turn in range(turns):
            prompts = []
            for h in histories:
                h += [rng.randrange(3, 4096) for _ in range(user_tokens)]
                prompts.append(list(h))
            ttft, answers = _ttfts(warm, prompts, answer_tokens)
            per_turn.append(ttft)
            for h, a in zip(histories, answers):
                h += a
            log(f"  turn {turn + 1}/{turns}: median TTFT {1000 * statistics.median(ttft):.1f} ms")
        last_prompts = prompts
        stats = warm.stats()
        pool = warm.core.scheduler.pool
        per_token = architecture("tiny").kv_cache_bytes_per_token("float32")
        held_blocks = pool.num_in_use + pool.num_cached
    with LLMEngine.from_config(ModelConfig(**base, enable_prefix_caching=False)) as cold:
        _ttfts(cold, [[1, 5, 6, 7]], 2)
        cold_ttft, _ = _ttfts(cold, last_prompts, answer_tokens)
    warm10 = statistics.median(per_turn[-1])
    cold10 = statistics.median(cold_ttft)
    return {
        "sessions": n_sessions, "turns": turns, "user_tokens_per_turn": user_tokens,
        "answer_tokens_per_turn": answer_tokens,
        "turn10_prompt_tokens_mean": statistics.mean(len(p) for p in last_prompts),
        "ttft_ms_median_per_turn": [1000 * statistics.median(t) for t in per_turn],
        "turn10_ttft_ms_warm": 1000 * warm10, "turn10_ttft_ms_cold": 1000 * cold10,
        "session_ttft_speedup": cold10 / warm10,
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "kv_blocks_held_by_sessions": held_blocks,
        "kv_bytes_held_by_sessions": held_blocks * pool.block_size * per_token,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slots", type=int, default=8, help="sequences the contiguous layout holds")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = ensure_tiny_checkpoint()
    r: dict = {"load_average_start": os.getloadavg()}
    log("capacity at equal KV memory ...")
    r["capacity"] = capacity(path, args.slots, args.context, requests=8 * args.slots)
    r["capacity_ratio"] = r["capacity"]["capacity_ratio"]
    log(f"{args.sessions} concurrent sessions of {args.turns} turns ...")
    r["sessions"] = sessions(path, args.sessions, args.turns, user_tokens=24, answer_tokens=16)
    r["session_ttft_speedup"] = r["sessions"]["session_ttft_speedup"]
    r["load_average_end"] = os.getloadavg()
    r["targets"] = {"capacity_ratio": 4.0, "session_ttft_speedup": 5.0}
    r["targets_met"] = {k: r[k] >= v for k, v in r["targets"].items()}
    c, s = r["capacity"], r["sessions"]
    print(f"\nKV memory of {c['slots_contiguous']} x {c['context_length']} tokens, prompts of "
          f"{c['mean_prompt_tokens']:.0f} tokens on average:")
    print(f"  contiguous: {c['slots_contiguous']} sequences; paged: {c['max_running_paged']} at once "
          f"({c['preemptions']} preemptions)")
    print(f"{s['sessions']} sessions x {s['turns']} turns, turn-10 prompts of {s['turn10_prompt_tokens_mean']:.0f} "
          f"tokens: TTFT {s['turn10_ttft_ms_warm']:.1f} ms (blocks reused) vs {s['turn10_ttft_ms_cold']:.1f} ms "
          f"(cold); sessions hold {s['kv_bytes_held_by_sessions'] / 2**20:.1f} MiB of KV")
    for k, target in r["targets"].items():
        print(f"{k:24} {r[k]:6.2f}  (target {target}, {'met' if r['targets_met'][k] else 'MISSED'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
