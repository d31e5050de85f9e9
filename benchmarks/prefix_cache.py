"""Prefix caching: time to first token of the 10th turn of a conversation, cache on vs off.

Both engines (same tiny model, one torch thread each) serve the same conversations, built as
the server builds them: the Llama 2 chat template over the whole history, so every turn's
prompt repeats the conversation so far. With prefix caching the engine shares the KV blocks of
the previous turns (no copy) and prefills only what is new.

Writes JSON (``--out``) with ``ttft_speedup`` (median 10th-turn TTFT off / on) and a PNG of the
TTFT per turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.tiny.checkpoint import ensure_tiny_checkpoint  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

TURNS = 10
SYSTEM = (
    "You are the support assistant of a bicycle shop. Answer politely, precisely and briefly. "
    "Ask for the order number when the customer mentions an order. Never invent prices. "
) * 3


def conversation(engine: LLMEngine, session: int) -> list[float]:
    """TTFT (s) of each turn of one conversation."""
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Customer {session}, message {turn}: my bike "
                         f"makes a noise when I brake on wet roads, what should I check first?"})
        prompt = engine.tokenizer.apply_chat_template(messages)
        params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        first = None
        text = []
        for delta in engine.submit(prompt, params):
            if first is None and delta.token_ids:
                first = time.perf_counter() - start
            text.append(delta.text)
        ttfts.append(first)
        messages.append({"role": "assistant", "content": "".join(text)})
    return ttfts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sessions", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = ensure_tiny_checkpoint()
    base = dict(model_size="tiny", checkpoint=str(path), dtype="float32", device="cpu",
                context_length=2048, max_tokens=256, max_num_seqs=8)
    results = {}
    prompt_tokens = []
    for label, caching in (("off", False), ("on", True)):
        engine = LLMEngine.from_config(ModelConfig(**base, enable_prefix_caching=caching))
        try:
            conversation(engine, 999)  # warm-up
            per_turn = [[] for _ in range(TURNS)]
            for s in range(args.sessions):
                for turn, t in enumerate(conversation(engine, s)):
                    per_turn[turn].append(t)
                print(f"  cache {label}: session {s + 1}/{args.sessions}", file=sys.stderr, flush=True)
            stats = engine.stats()
            results[label] = {
                "ttft_ms_median_per_turn": [1000 * statistics.median(ts) for ts in per_turn],
                "hit_rate": stats.prefix_cache_hit_rate,
                "hit_tokens": stats.prefix_cache_hit_tokens,
            }
            if not prompt_tokens:
                messages = [{"role": "system", "content": SYSTEM}]
                prompt_tokens.append(len(engine.tokenizer.apply_chat_template(
                    messages + [{"role": "user", "content": "x"}])))
        finally:
            engine.shutdown()
    off10 = results["off"]["ttft_ms_median_per_turn"][-1]
    on10 = results["on"]["ttft_ms_median_per_turn"][-1]
    report = {
        "turns": TURNS,
        "sessions": args.sessions,
        "ttft_ms_turn10_off": off10,
        "ttft_ms_turn10_on": on10,
        "ttft_speedup": off10 / on10,
        "target_speedup": 3.0,
        "target_met": off10 / on10 >= 3.0,
        **{f"cache_{k}": v for k, v in results.items()},
    }
    print(f"\n{'turn':>5}{'TTFT off (ms)':>16}{'TTFT on (ms)':>15}{'speedup':>10}")
    for t in range(TURNS):
        a, b = results["off"]["ttft_ms_median_per_turn"][t], results["on"]["ttft_ms_median_per_turn"][t]
        print(f"{t + 1:>5}{a:16.1f}{b:15.1f}{a / b:10.2f}")
    print(f"\nttft_speedup (turn {TURNS}) {report['ttft_speedup']:.2f}  (target 3.0, "
          f"{'met' if report['target_met'] else 'MISSED'}); hit rate {results['on']['hit_rate']:.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(1, TURNS + 1)
        ax.plot(xs, results["off"]["ttft_ms_median_per_turn"], "o-", label="prefix cache off")
        ax.plot(xs, results["on"]["ttft_ms_median_per_turn"], "s-", label="prefix cache on")
        ax.set_xlabel("turn of the conversation")
        ax.set_ylabel("time to first token (ms, median)")
        ax.set_title("Tiny Llama 2, CPU, 1 thread")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
