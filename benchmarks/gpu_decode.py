"""Decode throughput on one CUDA GPU (paged KV cache, eager), at batch 1 and batch 32.

The "small" model of the GPU tests (Llama-2-7B layer shapes, 4 layers, float16, random
weights; ``tests/gpu/conftest.py``) through the engine: B requests of the same prompt length
submitted together, each decoding ``--new-tokens`` tokens (ignore_eos), greedy. Decode
tokens/s = tokens generated / wall time from the first to the last token, so prefill is left
out. Each batch is run ``--repeats`` times after one warm-up and the median kept. Writes
JSON (``--out``).

Needs CUDA; without it, writes ``{"cuda": false}`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def decode_rate(engine, batch: int, new_tokens: int, prompt_len: int) -> float:
    from engine.types import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [[1] + [(7 * i + 13 * j) % 4000 + 3 for j in range(prompt_len - 1)] for i in range(batch)]
    first: list[float] = []
    done = 0
    streams = [engine.submit(p, params) for p in prompts]
    for s in streams:
        for out in s:
            if out.token_ids and not first:  # the first token: the batch's prefill is done
                first.append(time.perf_counter())
            done += len(out.token_ids)
    end = time.perf_counter()
    # tokens after the first step of the slowest-starting stream over the time they took
    return (done - batch) / (end - first[0]) if first else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu_decode.json")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: make the small one)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        out.write_text(json.dumps({"cuda": False}))
        print("no CUDA device: nothing measured")
        sys.exit(3)

    from cluster.config import ModelConfig
    from engine.engine import LLMEngine
    from engine.tiny.checkpoint import ensure_tiny_checkpoint
    from tests.gpu.conftest import SMALL_LAYERS, SMALL_SHAPES, make_small_checkpoint

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = make_small_checkpoint(Path(tempfile.mkdtemp()) / "small", ensure_tiny_checkpoint())
    batches = [int(b) for b in args.batches.split(",")]
    result: dict = {
        "cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "model": {"shapes": SMALL_SHAPES, "layers": SMALL_LAYERS, "dtype": "float16"} if not args.checkpoint
        else {"checkpoint": checkpoint.name},
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
        "decode_tokens_per_s": {},
    }
    config = ModelConfig(
        model_size="tiny", checkpoint=str(checkpoint), device="cuda", dtype="float16",
        max_num_seqs=max(batches), max_batched_tokens=max(2048, max(batches) * args.prompt_len),
        context_length=1024, max_tokens=args.new_tokens,
    )
    with LLMEngine.from_config(config) as engine:
        for batch in batches:
            decode_rate(engine, batch, 16, args.prompt_len)  # warm-up
            runs = [decode_rate(engine, batch, args.new_tokens, args.prompt_len) for _ in range(args.repeats)]
            key = f"batch_{batch}"
            result["decode_tokens_per_s"][key] = {"median": round(statistics.median(runs), 1),
                                                  "runs": [round(r, 1) for r in runs]}
            print(key, result["decode_tokens_per_s"][key], flush=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["decode_tokens_per_s"]))


if __name__ == "__main__":
    main()
