"""Random Llama checkpoints of given shapes, written the way real ones are, and the per-rank
processes that load them (used by test_slice_loading.py).

``write_checkpoint`` writes ``config.json`` and one safetensors file per decoder layer (plus
one for the embedding and one for norm + lm_head) with a ``model.safetensors.index.json``,
like a multi-file Hugging Face checkpoint, holding at most one layer in memory at a time.

``rank_main`` is one tensor-parallel rank in a process of its own: it joins a gloo group as
``TPWorker`` does and then, by ``mode``:
- ``compare``: loads with the former loader (``load_full_then_slice``: whole model, then
  AutoTP) and with the sliced loader; reports whether module types, split sizes, every
  parameter and buffer and the logits are identical.
- ``memory``: loads sliced only and reports its peak resident memory (``VmHWM``, reset just
  before), the resident memory before, the slice's bytes and the logits; then checks each
  parameter against ``split(_partition_sizes, dim)[tp_index]`` of the full checkpoint tensor
  (what AutoTP does to a loaded tensor).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

# Llama-2-70B's layer shapes (config.json of meta-llama/Llama-2-70b-hf)
LLAMA2_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
# Small, GQA, with an intermediate size that 3 and 4 do not divide evenly (uneven splits)
SMALL_GQA = dict(
    hidden_size=256, intermediate_size=690, num_attention_heads=8, num_key_value_heads=4,
    vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
)
SMALL_MHA8 = dict(SMALL_GQA, num_key_value_heads=8)  # for tp=8


def hf_config(shapes: dict, layers: int) -> dict:
    return dict(
        shapes, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
        hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2, attention_bias=False, mlp_bias=False,
    )


def write_checkpoint(path: Path, shapes: dict, layers: int, dtype: torch.dtype, seed: int = 0) -> int:
    """A random checkpoint at ``path``; returns its tensors' bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**hf_config(shapes, layers))
    config.save_pretrained(path)
    h, i, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    hd = h // shapes["num_attention_heads"]
    kv = shapes["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dtype)

    index: dict = {"metadata": {}, "weight_map": {}}
    total = 0

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        file = f"model-{name}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        for key, t in tensors.items():
            index["weight_map"][key] = file
            total += t.numel() * t.element_size()

    save("embed", {"model.embed_tokens.weight": rand(v, h)})
    for n in range(layers):  # one layer in memory at a time
        p = f"model.layers.{n}."
        save(f"layer{n}", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
        })
    save("head", {"model.norm.weight": norm(), "lm_head.weight": rand(v, h)})
    index["metadata"]["total_size"] = total
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
    })
    torch.set_num_threads(1)
    import deepspeed

    from engine.rank.loader import disable_deepspeed_shm_allreduce

    disable_deepspeed_shm_allreduce()
    if world > 1:
        deepspeed.init_distributed(
            dist_backend="gloo", timeout=timedelta(seconds=300), rank=rank, world_size=world
        )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return state


def _structure(model: torch.nn.Module) -> dict[str, tuple]:
    return {
        name: (type(m).__name__, tuple(getattr(m, "_partition_sizes", ()) or ()), getattr(m, "tp_index", None))
        for name, m in model.named_modules()
    }


def rank_main(rank: int, world: int, port: int, jobs: list[tuple[str, str]], mode: str, results) -> None:
    """Run each (checkpoint, dtype) job of ``mode`` in this rank; put its list of reports."""
    try:
        _join(rank, world, port)
        reports = [_rank(rank, world, Path(ckpt), getattr(torch, dtype), mode) for ckpt, dtype in jobs]
        results.put((rank, reports))
    except BaseException as exc:  # reported, not lost in a child's stderr
        import traceback

        results.put((rank, [{"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"}]))
    # flush the report before the process (and its process groups) goes away
    results.close()
    results.join_thread()


def compare_loaders(world: int, ckpt: Path, dtype: torch.dtype) -> dict:
    """The former and the sliced loader's results for this rank, compared (see the docstring)."""
    from cluster.config import ModelConfig
    from engine.rank.loader import load_full_then_slice
    from engine.rank.slice_loader import load_rank_slices, slice_bytes

    name = str(dtype).removeprefix("torch.")
    old = load_full_then_slice(ModelConfig(dtype=name), ckpt, world)
    new = load_rank_slices(ckpt, dtype=dtype, device="cpu", tp_size=world)
    a, b = _state(old), _state(new)
    with torch.no_grad():
        la, lb = old(IDS).logits, new(IDS).logits
    return {
        "structure_equal": _structure(old) == _structure(new),
        "names_equal": list(a) == list(b),
        "unequal": [k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])],
        "logits_equal": bool(torch.equal(la, lb)),
        "classes": sorted({type(m).__name__ for m in new.modules()}),
        "slice_bytes": slice_bytes(new),
    }


IDS = torch.tensor([[1, 15, 27, 300, 4, 99, 230, 7]])


def _rank(rank: int, world: int, ckpt: Path, dtype: torch.dtype, mode: str) -> dict:
    # everything the loaders import, imported before the memory baseline
    import deepspeed.inference.engine  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from engine.rank.slice_loader import load_rank_slices, slice_bytes

    if mode == "compare":
        return compare_loaders(world, ckpt, dtype)
    import gc

    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    model = load_rank_slices(ckpt, dtype=dtype, device="cpu", tp_size=world)
    peak = _status_kib("VmHWM") * 1024
    size = slice_bytes(model)
    with torch.no_grad():
        logits = model(IDS).logits.float()
    return {
        "baseline_rss": baseline, "peak_rss": peak, "slice_bytes": size,
        # a numpy copy: a torch tensor would cross by a file descriptor of this process,
        # gone once it exits
        "logits": logits.numpy() if rank == 0 else None, "slices_equal": _slices_match_autotp(model, ckpt),
    }


def _slices_match_autotp(model: torch.nn.Module, ckpt: Path) -> list[str]:
    """Parameters that differ from AutoTP's cut of the full checkpoint tensor (empty: none)."""
    from safetensors import safe_open

    from engine.rank.slice_loader import checkpoint_index

    index = checkpoint_index(ckpt)
    bad = []
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        with safe_open(index[name], framework="pt") as f:
            full = f.get_tensor(name).to(param.dtype)
        sizes = getattr(owner, "_partition_sizes", None)
        if tuple(full.shape) != tuple(param.shape):
            dim = 0 if type(owner).__name__ == "LinearLayer" else 1
            full = full.split(list(sizes), dim=dim)[owner.tp_index]
        if not torch.equal(full, param.detach()):
            bad.append(name)
        del full
    return bad
