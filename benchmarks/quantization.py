"""Weight quantization, measured: bytes, load time, prefill and decode speed, logit error.

For fp32, bf16, 8-bit (LLM.int8) and 4-bit (NF4) weights through the engine's own loader
(bitsandbytes on this machine's device) and model runner, on the tiny checkpoint and on a
larger Llama generated here (about 1B parameters, seeded random weights at the usual 0.02
scale, written as safetensors into a temporary directory and removed afterwards).

    python benchmarks/quantization.py --out out/quantization.json

JSON keys: ``int8_linear_bytes_ratio`` and ``int4_linear_bytes_ratio`` (quantized over fp32
bytes of the larger model's linear projections, scales included), ``int8_max_logit_diff``
(largest |logit - fp32 logit| of the larger model), and ``models.<name>.<precision>.*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.catalog import LlamaArchitecture, architecture  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from engine.rank.loader import load_model, model_weight_bytes  # noqa: E402
from engine.rank.model_runner import ModelRunner  # noqa: E402

PRECISIONS = {  # name -> (dtype, quantization)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "8bit": ("float32", "8bit"),
    "4bit": ("float32", "4bit"),
}
# ~1B parameters; every width a multiple of 64 (NF4) and of 128 (head_dim).
LARGE = LlamaArchitecture("llama-1b-generated", hidden_size=2048, intermediate_size=5632,
                          num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                          vocab_size=32000, max_position_embeddings=2048)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def generate_checkpoint(arch: LlamaArchitecture, out: Path, seed: int = 0) -> Path:
    """A Llama checkpoint of ``arch`` with seeded N(0, 0.02) weights (norms at 1)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(LlamaConfig(**arch.hf_config_dict())).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shapes[name])
        else:
            state[name] = torch.empty(shapes[name]).normal_(0.0, 0.02, generator=generator)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(arch.hf_config_dict()))
    return out


def model_config(path: Path, dtype: str, quantization: str | None, context: int) -> ModelConfig:
    # model_size only drives validation here; the loader reads the shapes from config.json.
    return ModelConfig(model_size="tiny", checkpoint=str(path), dtype=dtype, quantization=quantization,
                       device="cpu", context_length=context, max_tokens=16, max_num_seqs=8, max_batched_tokens=1024)


def measure(path: Path, precision: str, args, inputs: torch.Tensor, reference: torch.Tensor | None):
    dtype, quantization = PRECISIONS[precision]
    started = time.perf_counter()
    model = load_model(model_config(path, dtype, quantization, args.context), path)
    load_s = time.perf_counter() - started
    sizes = model_weight_bytes(model)
    with torch.inference_mode():
        logits = model(inputs).logits.float()
    per_seq = -(-args.context // 16)
    runner = ModelRunner(model, num_blocks=args.batch * per_seq, block_size=16, dtype=getattr(torch, dtype))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]
    prompts = [inputs[i % inputs.shape[0]].tolist()[: args.prompt_len] for i in range(args.batch)]
    chunks = [(p, 0, tables[i]) for i, p in enumerate(prompts)]
    prefill_s = decode_s = float("inf")
    for _ in range(1 + args.repeats):  # the first round warms up and is not counted
        started = time.perf_counter()
        tokens = runner.prefill(chunks).argmax(-1)  # rewrites the same blocks each round
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(args.decode_steps):
            tokens = runner.decode(tokens, [args.prompt_len + step] * args.batch, tables).argmax(-1)
        decode = time.perf_counter() - started
        if _:
            prefill_s, decode_s = min(prefill_s, prefill), min(decode_s, decode)
    result = {
        "weight_bytes": sizes["total"],
        "linear_bytes": sizes["linear"],
        "load_s": round(load_s, 3),
        "prefill_tokens_per_s": round(args.batch * args.prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(args.batch * args.decode_steps / decode_s, 1),
    }
    if reference is not None:
        diff = (logits - reference).abs()
        result["max_logit_diff"] = round(diff.max().item(), 5)
        result["rel_logit_error"] = round(((logits - reference).norm() / reference.norm()).item(), 5)
        result["top1_agreement"] = round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4)
    del model, runner
    gc.collect()
    return result, logits


def run_model(name: str, path: Path, args) -> dict:
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    inputs = torch.randint(3, vocab, (2, args.prompt_len), generator=torch.Generator().manual_seed(1))
    out, reference = {}, None
    for precision in PRECISIONS:
        say(f"{name}: {precision} ...")
        out[precision], logits = measure(path, precision, args, inputs, reference)
        if precision == "float32":
            reference = logits
        say(f"{name}: {precision} done: {json.dumps(out[precision])}")
    return out


def table(results: dict) -> str:
    head = f"{'model':<20} {'precision':<9} {'weights MiB':>11} {'linear x':>8} {'load s':>7} " \
           f"{'prefill tok/s':>13} {'decode tok/s':>12} {'max |dlogit|':>12} {'rel err':>8} {'top1':>6}"
    lines = [head, "-" * len(head)]
    for model, rows in results["models"].items():
        base = rows["float32"]["linear_bytes"]
        for precision, r in rows.items():
            lines.append(
                f"{model:<20} {precision:<9} {r['weight_bytes'] / 2**20:>11.1f} {r['linear_bytes'] / base:>8.3f} "
                f"{r['load_s']:>7.2f} {r['prefill_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>12.1f} "
                f"{r.get('max_logit_diff', 0):>12.4f} {r.get('rel_logit_error', 0):>8.4f} {r.get('top1_agreement', 1):>6.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/quantization.json"))
    parser.add_argument("--batch", type=int, default=4, help="sequences per prefill/decode step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best kept) after a warm-up")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--layers", type=int, default=LARGE.num_hidden_layers, help="layers of the generated model")
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model (seconds, not minutes)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from engine.tiny.checkpoint import ensure_tiny_checkpoint

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": vars(args) | {"out": str(args.out)},
        "models": {},
    }
    say("tiny checkpoint ...")
    results["models"]["m-ai-tiny"] = run_model("m-ai-tiny", ensure_tiny_checkpoint(), args)
    if not args.skip_large:
        from dataclasses import replace

        large = replace(LARGE, num_hidden_layers=args.layers)
        workdir = Path(tempfile.mkdtemp(prefix="m-ai-quant-bench-"))
        try:
            say(f"generating {large.name}: {large.parameter_count / 1e9:.2f}B parameters ...")
            path = generate_checkpoint(large, workdir / "model")
            results["models"][large.name] = run_model(large.name, path, args)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    name = next(reversed(results["models"]))
    rows = results["models"][name]
    results["ratios_model"] = name
    results["int8_linear_bytes_ratio"] = round(rows["8bit"]["linear_bytes"] / rows["float32"]["linear_bytes"], 4)
    results["int4_linear_bytes_ratio"] = round(rows["4bit"]["linear_bytes"] / rows["float32"]["linear_bytes"], 4)
    results["int8_max_logit_diff"] = rows["8bit"]["max_logit_diff"]
    results["int4_max_logit_diff"] = rows["4bit"]["max_logit_diff"]
    results["bf16_max_logit_diff"] = rows["bfloat16"]["max_logit_diff"]
    results["predicted_int8_linear_bytes_ratio"] = round(_predicted_ratio(name, "8bit"), 4)
    results["predicted_int4_linear_bytes_ratio"] = round(_predicted_ratio(name, "4bit"), 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nlinear bytes over fp32 ({name}): int8 {results['int8_linear_bytes_ratio']}, "
          f"int4 {results['int4_linear_bytes_ratio']}; max |logit diff| int8 {results['int8_max_logit_diff']}")
    say(f"wrote {args.out}")


def _predicted_ratio(name: str, quantization: str) -> float:
    arch = architecture("tiny") if name == "m-ai-tiny" else LARGE
    counts = arch.parameter_counts()
    rest = (counts.total - counts.linear) * 4
    return (arch.weight_bytes("float32", quantization) - rest) / (counts.linear * 4)


if __name__ == "__main__":
    main()
