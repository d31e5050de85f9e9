"""M-AI's engine against vLLM's CPU build, side by side on the same machine.

Same checkpoints (the tiny one and the ~91M-parameter "small" one, both random weights from a
seed), same 64 prompts of 32-512 tokens, same output lengths of 32-256 tokens (fixed with
ignore_eos), greedy, the same cap of 32 sequences in flight, the same thread count (1, then
2), no prefix hits (the prompts are random tokens and every run is a fresh process). Each run
is its own process started the same way for both engines; runs alternate (M-AI, vLLM, M-AI,
...) so the machine's other load hits both alike, and the median of ``--repeats`` runs is
reported. Start-up (loading, vLLM's compilation) is not timed: only the generation of the 64
requests, from submitting them all to the last token.

vLLM runs from its own virtual environment (``make bench-peers`` makes one under
``.cache/peers/vllm``; ``--vllm-python`` points elsewhere). Its threads are bound with
``VLLM_CPU_OMP_THREADS_BIND`` (``0`` for one, ``0-1`` for two) and its KV cache is
``VLLM_CPU_KVCACHE_SPACE`` GiB; M-AI gets ``cpu_threads_per_rank`` threads. Where vLLM
cannot run, its error is written to the JSON and M-AI's figures alone are reported.

Prints and writes (``--out``) ``speedup_vs_vllm_1t`` and ``speedup_vs_vllm_2t`` (tiny) and
``small_speedup_vs_vllm_2t``: M-AI tokens/s over vLLM tokens/s, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = REPO / ".cache" / "peers" / "vllm" / "bin" / "python"
NUM_PROMPTS = 64
MAX_IN_FLIGHT = 32
CONTEXT = 1024


def workload(seed: int = 0, vocab: int = 4096) -> tuple[list[list[int]], list[int]]:
    """64 prompts of 32-512 random tokens (after BOS) and output lengths of 32-256."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(NUM_PROMPTS):
        n_in = rng.randint(32, 512)
        prompts.append([1] + [rng.randrange(3, vocab) for _ in range(n_in - 1)])
        outputs.append(rng.randint(32, 256))
    return prompts, outputs


# -- the workers: one process per run --------------------------------------------------------


def run_mai(model_dir: str, size: str, threads: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from cluster.config import ModelConfig
    from engine.engine import LLMEngine
    from engine.types import SamplingParams

    torch.set_num_threads(threads)
    prompts, outputs = workload()
    config = ModelConfig(model_size=size, checkpoint=model_dir, dtype="float32", device="cpu",
                         max_num_seqs=MAX_IN_FLIGHT, max_batched_tokens=2048, context_length=CONTEXT,
                         max_tokens=256, cpu_threads_per_rank=threads, enable_prefix_caching=False)
    with LLMEngine.from_config(config) as engine:
        warm = engine.submit(prompts[0][:40], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        warm.result()
        start = time.perf_counter()
        streams = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                   for p, n in zip(prompts, outputs)]
        tokens = sum(len(s.result().token_ids) for s in streams)
        elapsed = time.perf_counter() - start
    assert tokens == sum(outputs), "M-AI returned fewer tokens than asked"
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed}


def run_vllm(model_dir: str, threads: int) -> dict:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, outputs = workload()
    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", max_num_seqs=MAX_IN_FLIGHT,
              max_model_len=CONTEXT, enable_prefix_caching=False, seed=0)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:40])],
                 SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    assert tokens == sum(outputs), "vLLM returned fewer tokens than asked"
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed}


# -- the driver ---------------------------------------------------------------------------


def _launch(python: str, args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    try:
        proc = subprocess.run([python, __file__, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout={timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file to write (required)")
    ap.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON),
                    help="python of the virtual environment with vllm-cpu (make bench-peers)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per engine; medians reported")
    ap.add_argument("--cases", default="tiny:1,tiny:2,small:2",
                    help="model:threads pairs to run, comma-separated")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (start-up included)")
    ap.add_argument("--worker", choices=["mai", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "mai":
        print(json.dumps(run_mai(args.model_dir, args.size, args.threads)))
        return
    if args.worker == "vllm":
        print(json.dumps(run_vllm(args.model_dir, args.threads)))
        return

    if not args.out:
        ap.error("--out is required")
    sys.path.insert(0, str(REPO))
    from engine.tiny.checkpoint import ensure_tiny_checkpoint
    from engine.tiny.small_checkpoint import ensure_small_checkpoint

    dirs = {"tiny": str(ensure_tiny_checkpoint()), "small": str(ensure_small_checkpoint())}
    have_vllm = Path(args.vllm_python).exists()
    prompts, outputs = workload()
    r: dict = {"num_prompts": NUM_PROMPTS, "prompt_tokens": sum(map(len, prompts)),
               "output_tokens": sum(outputs), "max_in_flight": MAX_IN_FLIGHT, "repeats": args.repeats,
               "load_average_start": os.getloadavg(), "cases": {}}
    if not have_vllm:
        r["vllm_error"] = f"{args.vllm_python} does not exist; run `make bench-peers` or pass --vllm-python"
    for case in args.cases.split(","):
        size, threads = case.split(":")
        runs: dict = {"mai": [], "vllm": []}
        for i in range(args.repeats):
            for engine in ("mai", "vllm"):
                if engine == "vllm" and not have_vllm:
                    continue
                python = sys.executable if engine == "mai" else args.vllm_python
                print(f"{size}, {threads} thread(s), {engine}, run {i + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                res = _launch(python, ["--worker", engine, "--model-dir", dirs[size], "--size", size,
                                       "--threads", threads], args.timeout)
                res["load_average"] = os.getloadavg()[0]
                runs[engine].append(res)
                if "error" in res:
                    print(f"  {engine} failed: {res['error'][-300:]}", file=sys.stderr, flush=True)
                else:
                    print(f"  {engine}: {res['tokens_per_s']:.1f} tokens/s ({res['seconds']:.1f} s, load "
                          f"{res['load_average']:.1f})", file=sys.stderr, flush=True)
                r["cases"][case] = {"runs": runs}  # partial results survive an interrupted run
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(r, indent=2))
        entry = {"runs": runs}
        for engine, rs in runs.items():
            ok = [x["tokens_per_s"] for x in rs if "tokens_per_s" in x]
            entry[f"{engine}_tokens_per_s"] = statistics.median(ok) if ok else None
        if entry["mai_tokens_per_s"] and entry.get("vllm_tokens_per_s"):
            entry["speedup"] = entry["mai_tokens_per_s"] / entry["vllm_tokens_per_s"]
        r["cases"][case] = entry
    names = {"tiny:1": "speedup_vs_vllm_1t", "tiny:2": "speedup_vs_vllm_2t", "small:2": "small_speedup_vs_vllm_2t"}
    targets = {"speedup_vs_vllm_1t": 1.1, "speedup_vs_vllm_2t": 1.1, "small_speedup_vs_vllm_2t": 1.0}
    r["load_average_end"] = os.getloadavg()
    print(f"\n{'case':12}{'M-AI tok/s':>12}{'vLLM tok/s':>12}{'ratio':>8}")
    for case, entry in r["cases"].items():
        mai, vllm = entry["mai_tokens_per_s"], entry.get("vllm_tokens_per_s")
        ratio = entry.get("speedup")
        print(f"{case:12}{mai or 0:12.0f}{vllm or 0:12.0f}{ratio or 0:8.2f}")
        if case in names:
            r[names[case]] = ratio
    r["targets"] = targets
    r["targets_met"] = {k: (r.get(k) or 0) >= v for k, v in targets.items() if k in r}
    for k, met in r["targets_met"].items():
        print(f"{k:28} {r[k] or 0:6.2f}  (target {targets[k]}, {'met' if met else 'MISSED'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
