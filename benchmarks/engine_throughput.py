"""Engine throughput against Hugging Face generate and against the raw forward loop.

The same tiny model, the same 64 prompts of mixed lengths and the same per-request output
lengths (fixed with ignore_eos, as in real traffic they differ) in one run, on one torch
thread each, greedy decoding:

- hf_sequential: ``model.generate`` one request at a time;
- hf_static_batch: ``generate`` on left-padded static batches of 32 (a batch runs until its
  longest member is done: the others wait);
- forward_loop@B: the raw batched forward loop of the same model through the engine's own
  model runner (slot KV cache; no scheduling, no sampling, no detokenization), in groups of
  B requests, each group decoding its members' mean output length with the batch always
  full: the ceiling the engine's bookkeeping can approach;
- hf_forward_loop@B: the same loop through Hugging Face's forward and DynamicCache, for
  reference (slower per step than the runner: it concatenates the cache every step);
- engine@C: M-AI's engine with a client keeping C requests in flight (a closed loop: a
  request is sent as soon as one of the C in flight finishes, until the 64 are served, so the
  last steps run at a shrinking batch, as any finite workload does).

The machine's other load makes single runs drift by several percent, so forward_loop@C and
engine@C, the pair the efficiency target compares, are measured ``--repeats`` times,
alternating, and the median of each is reported (every run is in the JSON). Before each
engine run its prefix cache is emptied (a previous run's prompts would otherwise skip their
prefill, which no baseline can do). The HF baselines run as many times (medians).

The "small" model (~91M parameters, hidden 768, 12 layers, random weights from a seed) adds
``small_decode_flops_fraction``: the runner's decode step at batch 32 (256-token contexts), in
FLOP/s, over the FLOP/s of a 2048^3 fp32 matmul measured in the same run (``--small-only``
runs just that part, ``--skip-small`` leaves it out).

For reading the efficiency, not a target: ``sustained_32`` runs the same closed loop of 32
(and the raw loop) over 256 requests, where the drain weighs a quarter as much.

Writes JSON (``--out``) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.tiny.checkpoint import ensure_tiny_checkpoint  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

NUM_PROMPTS = 64
CONCURRENCY = (1, 8, 32)
STEADY_FACTOR = 4  # the informational sustained run serves this many times NUM_PROMPTS


def workload(vocab: int, seed: int = 0, n: int = NUM_PROMPTS) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts of 16-256 tokens and output lengths of 16-160 tokens, both skewed short
    (the first 64 of any ``n`` are the same for one seed)."""
    g = torch.Generator().manual_seed(seed)
    prompts, outputs = [], []
    for _ in range(n):
        n_in = int(16 + 240 * torch.rand(1, generator=g).item() ** 2)
        n_out = int(16 + 144 * torch.rand(1, generator=g).item() ** 1.5)
        prompts.append([1] + torch.randint(3, vocab, (n_in - 1,), generator=g).tolist())
        outputs.append(n_out)
    return prompts, outputs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_hf_sequential(model, prompts, outputs) -> float:
    tokens, start = 0, time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
        if i % 16 == 15:
            log(f"  hf_sequential {i + 1}/{len(prompts)}")
    return tokens / (time.perf_counter() - start)


def _left_pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def bench_hf_static(model, prompts, outputs, batch_size: int) -> float:
    useful, start = 0, time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        group, lens = prompts[b:b + batch_size], outputs[b:b + batch_size]
        ids, mask = _left_pad(group)
        longest = max(lens)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=0)
        useful += sum(lens)  # tokens past a member's own length are waste
    return useful / (time.perf_counter() - start)


@torch.inference_mode()
def bench_forward_loop(model, prompts, outputs, batch_size: int) -> float:
    """The engine's model runner driven directly: prefill the group, then full-batch decode."""
    from engine.rank.model_runner import ModelRunner

    per_seq = 1024 // 16  # blocks of 16 tokens: each sequence its own consecutive run
    runner = ModelRunner(model, num_blocks=batch_size * per_seq, block_size=16)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]
    tokens, start = 0, time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        group, lens = prompts[b:b + batch_size], outputs[b:b + batch_size]
        steps = round(sum(lens) / len(lens))
        runner.prefill([(p, 0, tables[i]) for i, p in enumerate(group)])
        n = len(group)
        nxt = torch.full((n,), 5, dtype=torch.long)
        for step in range(steps - 1):
            runner.decode(nxt, [len(p) + step for p in group], tables[:n])
        tokens += steps * n
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def bench_hf_forward_loop(model, prompts, outputs, batch_size: int) -> float:
    from transformers import DynamicCache

    tokens, start = 0, time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        group, lens = prompts[b:b + batch_size], outputs[b:b + batch_size]
        steps = round(sum(lens) / len(lens))
        ids, mask = _left_pad(group)
        cache = DynamicCache(config=model.config)
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones(len(group), 1, dtype=torch.long)], 1)
            model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        tokens += steps * len(group)
    return tokens / (time.perf_counter() - start)


def bench_engine(engine: LLMEngine, prompts, outputs, concurrency: int) -> tuple[float, dict]:
    """A client keeping ``concurrency`` requests in flight until all prompts are served."""
    sem = threading.Semaphore(concurrency)
    results: list = [None] * len(prompts)
    threads = []

    def run(i: int) -> None:
        try:
            params = SamplingParams(max_tokens=outputs[i], temperature=0.0, ignore_eos=True)
            results[i] = engine.submit(prompts[i], params).result()
        finally:
            sem.release()

    start = time.perf_counter()
    for i in range(len(prompts)):
        sem.acquire()
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens == sum(outputs), "the engine returned fewer tokens than asked"
    ttft = sorted(r.first_token_time - r.arrival_time for r in results)
    return tokens / elapsed, {"ttft_p50_ms": 1000 * ttft[len(ttft) // 2]}


def matmul_gflops(n: int = 2048, tries: int = 5) -> float:
    """The machine's fp32 limit on this thread count: the best of ``tries`` n x n x n matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


@torch.inference_mode()
def decode_step_gflops(model, batch: int = 32, context: int = 256, steps: int = 12) -> tuple[float, float]:
    """Achieved GFLOP/s of the runner's decode step at ``batch`` sequences of ``context``
    tokens (median step time), counting the linear layers, lm_head and attention."""
    from cluster.catalog import architecture
    from engine.rank.model_runner import ModelRunner

    per_seq = -(-(context + steps + 1) // 16)
    runner = ModelRunner(model, num_blocks=batch * per_seq, block_size=16)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    for i in range(batch):
        runner.prefill([([1] + [5] * (context - 1), 0, tables[i])])
    counts = architecture("small").parameter_counts()
    linear = counts.attention + counts.mlp + counts.lm_head
    cfg = model.config
    times = []
    nxt = torch.full((batch,), 5, dtype=torch.long)
    for step in range(steps):
        start = time.perf_counter()
        runner.decode(nxt, [context + step] * batch, tables)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    attn = 4 * batch * (context + steps // 2) * cfg.hidden_size * cfg.num_hidden_layers
    flops = 2 * batch * linear + attn
    return flops / step_time / 1e9, step_time


def bench_small(repeats: int) -> dict:
    """The ~91M-parameter model: engine@32 over the same workload, and the decode step's
    achieved FLOP/s against a large fp32 matmul's, both on this run's thread count."""
    from transformers import LlamaForCausalLM

    from engine.tiny.small_checkpoint import ensure_small_checkpoint

    path = ensure_small_checkpoint()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, outputs = workload(model.config.vocab_size)
    prompts, outputs = prompts[:32], outputs[:32]  # one full batch: the 91M model is slow here
    config = ModelConfig(model_size="small", checkpoint=str(path), dtype="float32", device="cpu",
                         max_num_seqs=32, max_batched_tokens=2048, context_length=1024, max_tokens=256)
    res: dict = {"num_prompts": len(prompts), "output_tokens": sum(outputs), "engine": [], "decode": [], "matmul": []}
    engine = LLMEngine.from_config(config)
    try:
        bench_engine(engine, prompts[:2], [4, 4], 2)  # warm-up
        for i in range(repeats):
            log(f"small model: matmul limit, decode step, engine@32 (run {i + 1}/{repeats}) ...")
            res["matmul"].append(matmul_gflops())
            res["decode"].append(decode_step_gflops(model)[0])
            engine.core.scheduler.clear_prefix_cache()
            res["engine"].append(bench_engine(engine, prompts, outputs, 32)[0])
    finally:
        engine.shutdown()
    median = statistics.median
    res["matmul_gflops"] = median(res["matmul"])
    res["decode_gflops"] = median(res["decode"])
    res["decode_flops_fraction"] = median(d / m for d, m in zip(res["decode"], res["matmul"]))
    res["engine_tokens_per_s"] = median(res["engine"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG is written next to it)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the embedded tiny one)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of every measurement (engine and raw loop alternating); medians reported")
    ap.add_argument("--skip-small", action="store_true", help="leave out the small (~91M) model")
    ap.add_argument("--small-only", action="store_true", help="only the small model's figures")
    args = ap.parse_args()
    if args.small_only:
        torch.set_num_threads(1)
        small = bench_small(args.repeats)
        r = {"small": small, "small_decode_flops_fraction": small["decode_flops_fraction"],
             "targets": {"small_decode_flops_fraction": 0.5}}
        r["targets_met"] = {"small_decode_flops_fraction": small["decode_flops_fraction"] >= 0.5}
        print(f"small (91M): engine@32 {small['engine_tokens_per_s']:.0f} tokens/s; decode step at batch 32 "
              f"{small['decode_gflops']:.1f} GFLOP/s of {small['matmul_gflops']:.1f} (fp32 matmul): "
              f"small_decode_flops_fraction {small['decode_flops_fraction']:.2f} (target 0.5)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, indent=2))
        return

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()  # generate() warns once per call otherwise
    path = Path(args.checkpoint) if args.checkpoint else ensure_tiny_checkpoint()
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, outputs = workload(model.config.vocab_size)
    log(f"workload: {len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, "
        f"{sum(outputs)} output tokens")

    r: dict = {"model": str(path.name), "num_prompts": len(prompts), "output_tokens": sum(outputs),
               "torch_threads": torch.get_num_threads()}
    hf_runs: dict = {"hf_sequential": [], "hf_static_batch": []}
    for i in range(args.repeats):  # as many runs as the engine gets; medians reported
        log(f"hf generate, one request at a time, and static batches of 32 (run {i + 1}/{args.repeats}) ...")
        hf_runs["hf_sequential"].append(bench_hf_sequential(model, prompts, outputs))
        hf_runs["hf_static_batch"].append(bench_hf_static(model, prompts, outputs, 32))
    r["hf_sequential_tokens_per_s"] = statistics.median(hf_runs["hf_sequential"])
    r["hf_static_batch_tokens_per_s"] = statistics.median(hf_runs["hf_static_batch"])
    r["hf_runs"] = hf_runs
    r["hf_forward_loop_tokens_per_s"] = {}
    for b in CONCURRENCY:
        log(f"hf forward loop, batch {b} ...")
        r["hf_forward_loop_tokens_per_s"][b] = bench_hf_forward_loop(model, prompts, outputs, b)

    config = ModelConfig(model_size="tiny", checkpoint=str(path), dtype="float32", device="cpu",
                         max_num_seqs=32, max_batched_tokens=2048, context_length=1024, max_tokens=256)
    # Other prompts of the same shape warm the engine up; before each run the prefix cache is
    # emptied, so no measured prompt skips its prefill (no baseline could).
    flush_prompts, _ = workload(model.config.vocab_size, seed=1)
    flush_prompts = flush_prompts[:8]
    engine = LLMEngine.from_config(config)
    runs: dict = {"forward_loop": {}, "engine": {}, "engine_ttft_p50_ms": {}}
    try:
        bench_engine(engine, flush_prompts, [8] * len(flush_prompts), 8)  # warm-up
        for c in CONCURRENCY:
            for k in runs:
                runs[k][c] = []
            for i in range(args.repeats):
                log(f"raw forward loop, batch {c}, and engine, {c} concurrent (run {i + 1}/{args.repeats}) ...")
                runs["forward_loop"][c].append(bench_forward_loop(model, prompts, outputs, c))
                engine.core.scheduler.clear_prefix_cache()
                tps, extra = bench_engine(engine, prompts, outputs, c)
                runs["engine"][c].append(tps)
                runs["engine_ttft_p50_ms"][c].append(extra["ttft_p50_ms"])
        # Not a target, for reading the one above: the same closed loop of 32 over 4x the
        # requests, where the drain at the end weighs a quarter as much.
        log(f"sustained: raw forward loop and engine, {STEADY_FACTOR * NUM_PROMPTS} requests ...")
        more_prompts, more_outputs = workload(model.config.vocab_size, n=STEADY_FACTOR * NUM_PROMPTS)
        fl = bench_forward_loop(model, more_prompts, more_outputs, 32)
        engine.core.scheduler.clear_prefix_cache()
        tps, _ = bench_engine(engine, more_prompts, more_outputs, 32)
        r["sustained_32"] = {"num_prompts": len(more_prompts), "output_tokens": sum(more_outputs),
                             "forward_loop_tokens_per_s": fl, "engine_tokens_per_s": tps,
                             "efficiency_vs_forward_loop": tps / fl}
    finally:
        engine.shutdown()
    del model
    median = statistics.median
    r["repeats"] = args.repeats
    r["forward_loop_tokens_per_s"] = {c: median(v) for c, v in runs["forward_loop"].items()}
    r["engine_tokens_per_s"] = {c: median(v) for c, v in runs["engine"].items()}
    r["engine_ttft"] = {c: {"ttft_p50_ms": median(v)} for c, v in runs["engine_ttft_p50_ms"].items()}
    r["runs"] = runs

    e32 = r["engine_tokens_per_s"][32]
    r["speedup_vs_hf_sequential"] = e32 / r["hf_sequential_tokens_per_s"]
    r["speedup_vs_hf_static_batch"] = e32 / r["hf_static_batch_tokens_per_s"]
    r["efficiency_vs_forward_loop"] = e32 / r["forward_loop_tokens_per_s"][32]  # for reading
    if not args.skip_small:
        r["small"] = bench_small(args.repeats)
        r["small_decode_flops_fraction"] = r["small"]["decode_flops_fraction"]
    r["targets"] = {"speedup_vs_hf_sequential": 6.0, "speedup_vs_hf_static_batch": 1.3}
    if "small_decode_flops_fraction" in r:
        r["targets"]["small_decode_flops_fraction"] = 0.5
    r["targets_met"] = {k: r[k] >= v for k, v in r["targets"].items()}
    print_table(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    plot(r, out.with_suffix(".png"))


def print_table(r: dict) -> None:
    seq = r["hf_sequential_tokens_per_s"]
    print(f"\n{'':28}{'tokens/s':>10}{'x hf seq':>10}")
    print(f"{'hf generate, sequential':28}{seq:10.0f}{1.0:10.2f}")
    print(f"{'hf generate, static b=32':28}{r['hf_static_batch_tokens_per_s']:10.0f}"
          f"{r['hf_static_batch_tokens_per_s'] / seq:10.2f}")
    for c in CONCURRENCY:
        fl, en = r["forward_loop_tokens_per_s"][c], r["engine_tokens_per_s"][c]
        hf = r["hf_forward_loop_tokens_per_s"][c]
        print(f"{f'hf forward loop, b={c}':28}{hf:10.0f}{hf / seq:10.2f}")
        print(f"{f'raw forward loop, b={c}':28}{fl:10.0f}{fl / seq:10.2f}")
        print(f"{f'engine, {c} concurrent':28}{en:10.0f}{en / seq:10.2f}   ({en / fl:.0%} of the raw loop)")
    if "small" in r:
        sm = r["small"]
        print(f"{'small (91M), engine, 32':28}{sm['engine_tokens_per_s']:10.0f}"
              f"   decode step b=32: {sm['decode_gflops']:.1f} GFLOP/s of {sm['matmul_gflops']:.1f} (fp32 matmul)")
    sustained = r["sustained_32"]
    print(f"{'engine, 32, ' + str(sustained['num_prompts']) + ' requests':28}"
          f"{sustained['engine_tokens_per_s']:10.0f}{sustained['engine_tokens_per_s'] / seq:10.2f}"
          f"   ({sustained['efficiency_vs_forward_loop']:.0%} of the raw loop; not a target)")
    print()
    for k, target in r["targets"].items():
        mark = "met" if r["targets_met"][k] else "MISSED"
        print(f"{k:30} {r[k]:6.2f}  (target {target}, {mark})")


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(CONCURRENCY)
    ax.plot(xs, [r["engine_tokens_per_s"][c] for c in xs], "o-", label="M-AI engine")
    ax.plot(xs, [r["forward_loop_tokens_per_s"][c] for c in xs], "s--", label="raw forward loop")
    ax.axhline(r["hf_sequential_tokens_per_s"], color="gray", ls=":", label="HF generate, sequential")
    ax.axhline(r["hf_static_batch_tokens_per_s"], color="red", ls=":", label="HF generate, static b=32")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Tiny Llama 2, CPU, 1 thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
