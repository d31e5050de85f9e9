"""Per-rank loading: each tensor-parallel rank reads only its own slices of the checkpoint.

The old way (``engine.rank.loader.load_full_then_slice``) read the whole model into every rank's
host memory before DeepSpeed AutoTP cut it: Llama-2-70B in float16 is ~138 GB per rank, x8
ranks on one node. Here:

1. The model is built on the meta device (no memory), in the target dtype.
2. DeepSpeed's own AutoTP runs on it (``init_inference``, ``replace_with_kernel_inject=False``):
   it swaps the decoder layers' linears and lm_head for its sliced layers exactly as it
   does for a loaded model, but meta tensors stay meta, so only shapes are cut; each sliced
   layer records its split (``_partition_sizes``) and its index in the group (``tp_index``).
   DeepSpeed then allocates the rank's parameters, uninitialised, on the rank's device
   (``to_empty``). At tp_size=1 on the CPU, where DeepSpeed is not used, ``to_empty`` alone.
3. Each parameter is filled from the safetensors file that holds it with
   ``safe_open(...).get_slice(name)[...]``: the whole tensor when the rank's shape equals the
   checkpoint's, else the rank's rows (column-parallel q/k/v/gate/up) or columns
   (row-parallel o/down/lm_head) at the offset the layer's own split gives — the same
   ``split(_partition_sizes, dim)[tp_index]`` AutoTP applies to a loaded tensor, so the
   result is AutoTP's, element for element (tests compare them). Rows are read 64 MiB at a
   time, the file opened anew for each chunk so that the pages of the memory map a rank
   touched are released chunk by chunk: a rank's peak resident memory stays near its slice's
   size.
4. Buffers that are not in the checkpoint (the rotary embedding's ``inv_freq``) are computed
   as Hugging Face computes them when it loads a model built on meta, then cast as DeepSpeed
   cast them.

Casts (a float16 checkpoint loaded as bfloat16, say) happen per slice, with ``Tensor.to``,
as ``from_pretrained`` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("engine.rank.slice_loader")

CHUNK_BYTES = 64 << 20  # rows read per open of a safetensors file


def checkpoint_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors.index.json`` when
    present, else every ``*.safetensors`` file's own header)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"checkpoint {path.name!r} has no *.safetensors files; per-rank loading reads "
            f"safetensors only (convert .bin weights with transformers' save_pretrained)",
            param="checkpoint",
        )
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                index[name] = file
    return index


def build_meta_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``LlamaForCausalLM`` of ``path``'s config on the meta device, in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig.from_pretrained(path)
    if getattr(hf_config, "tie_word_embeddings", False):
        raise CheckpointError(
            f"checkpoint {path.name!r} ties lm_head to the embedding (tie_word_embeddings=True); "
            f"Llama 2 checkpoints do not, and per-rank loading does not support it",
            param="checkpoint",
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in dtype; explicit-dtype buffers keep theirs
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_rank_slices(
    path: Path, *, dtype: torch.dtype, device: str, tp_size: int
) -> torch.nn.Module:
    """This rank's part of the model at ``path`` (see the module docstring).

    For ``tp_size > 1`` the process group must be initialised; on CUDA the rank's device must
    be current (``torch.cuda.set_device``), as for ``init_inference``.
    """
    started = time.perf_counter()
    model = build_meta_model(path, dtype)
    if tp_size > 1 or device == "cuda":
        import deepspeed

        engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
        )
        model = engine.module
        if any(p.is_meta for p in model.parameters()):  # DeepSpeed left it on meta
            model.to_empty(device=_device_name(device))
    else:
        model.to_empty(device="cpu")
    read = fill_from_checkpoint(model, path)
    reset_rotary_buffers(model)
    log.info(
        "sliced weights loaded",
        extra={
            "checkpoint": path.name, "tp_size": tp_size, "dtype": str(dtype).removeprefix("torch."),
            "read_mib": read >> 20, "slice_mib": slice_bytes(model) >> 20,
            "load_s": round(time.perf_counter() - started, 2),
        },
    )
    return model


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model


def slice_of(module: torch.nn.Module, full: list[int], local: list[int], name: str) -> tuple:
    """The index of this rank's part of a checkpoint tensor of shape ``full`` whose parameter
    here has shape ``local``: everything, or one dimension cut at the module's own split."""
    if len(full) != len(local):
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {full}, the model expects {local}; the "
            f"checkpoint does not match its config.json",
            param="checkpoint",
        )
    cut = [d for d in range(len(full)) if full[d] != local[d]]
    if not cut:
        return tuple(slice(None) for _ in full)
    sizes = getattr(module, "_partition_sizes", None)
    index = getattr(module, "tp_index", None)
    dim = cut[0]
    if len(cut) > 1 or sizes is None or index is None or sum(sizes) != full[dim] or sizes[index] != local[dim]:
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {full}, this rank's parameter {local} "
            f"(split {sizes}, rank {index}); the checkpoint does not match its config.json",
            param="checkpoint",
        )
    start = sum(sizes[:index])
    return tuple(slice(start, start + local[dim]) if d == dim else slice(None) for d in range(len(full)))


@torch.no_grad()
def fill_from_checkpoint(model: torch.nn.Module, path: Path) -> int:
    """Copy this rank's slice of every parameter from ``path``; returns the bytes read."""
    from safetensors import safe_open

    index = checkpoint_index(path)
    missing = [n for n, _ in model.named_parameters() if n not in index]
    if missing:
        raise CheckpointError(
            f"checkpoint {path.name!r} lacks {len(missing)} tensor(s) the model needs, e.g. "
            f"{missing[:3]}; it is incomplete or not a Llama checkpoint",
            param="checkpoint",
        )
    read = 0
    for name, param in model.named_parameters():
        with safe_open(index[name], framework="pt") as f:
            part = f.get_slice(name)
            shape = list(part.get_shape())
        where = slice_of(_owner(model, name), shape, list(param.shape), name)
        read += _copy_in_chunks(index[name], name, param, where)
    return read


def _copy_in_chunks(file: Path, name: str, param: torch.Tensor, where: tuple) -> int:
    """Copy ``where`` of tensor ``name`` into ``param``, ``CHUNK_BYTES`` of rows at a time.

    Each chunk opens the file anew: closing it unmaps the pages it read, so what a rank holds
    beyond its slice while loading is one chunk and its pages (not a whole 500 MB embedding
    twice over); the page cache keeps the pages for the other ranks.
    """
    from safetensors import safe_open

    rows = param.shape[0] if param.dim() else 1
    row_bytes = max(1, param[0].numel() * param.element_size()) if param.dim() else param.element_size()
    step = max(1, CHUNK_BYTES // row_bytes)
    first = (where[0].start or 0) if param.dim() else 0
    read = 0
    for r in range(0, rows, step):
        n = min(step, rows - r)
        index = ((slice(first + r, first + r + n),) + where[1:]) if param.dim() else where
        with safe_open(file, framework="pt") as f:
            data = f.get_slice(name)[index]
        read += data.numel() * data.element_size()
        (param[r : r + n] if param.dim() else param).copy_(data.to(param.dtype))
        del data
    return read


@torch.no_grad()
def reset_rotary_buffers(model: torch.nn.Module) -> None:
    """Recompute the rotary embedding's ``inv_freq`` and ``original_inv_freq`` as Hugging Face
    does (``PreTrainedModel._init_weights``); they are not in the checkpoint and were left
    uninitialised. Copying casts them as DeepSpeed cast the buffers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "original_inv_freq"):
            continue
        if module.rope_type == "default":
            rope_fn = module.compute_default_rope_parameters
        else:
            rope_fn = ROPE_INIT_FUNCTIONS[module.rope_type]
        with torch.device("cpu"):
            inv_freq, _ = rope_fn(module.config)
        module.inv_freq.copy_(inv_freq)
        module.original_inv_freq.copy_(inv_freq)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"buffers {leftover} were not initialised", param="checkpoint")


def slice_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["load_rank_slices", "build_meta_model", "fill_from_checkpoint", "checkpoint_index", "slice_bytes"]
