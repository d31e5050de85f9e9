"""Load a Llama 2 checkpoint (Hugging Face layout) and slice or quantize it.

Unquantized weights are loaded sliced (``engine.rank.slice_loader``): the model is built on the
meta device, DeepSpeed AutoTP cuts its shapes, and each rank reads only its own slices from
the safetensors files, so a rank holds its slice, never the whole model.
``load_full_then_slice`` is the former way (``from_pretrained`` of the whole model, then
AutoTP); it stays as the reference the sliced result is tested against. Quantized weights
go through ``from_pretrained`` (bitsandbytes quantizes while loading). Tensor parallelism and
quantization are applied after construction: the model code stays model code.

- ``resolve_checkpoint`` turns ``config.checkpoint`` (directory, store version, cached
  ``name@version``, ``hf://``) into a verified local directory (``cluster.checkpoints.resolve``).
- ``quantization`` (8bit, 4bit NF4) goes through bitsandbytes' ``BitsAndBytesConfig``, on the
  CPU and on CUDA alike; quantized weights are not sliced (the config demands tp_size=1).
- ``lazy_load`` builds the model on the meta device and reads the weights when the first
  request reaches the model (a forward pre-hook on the embedding); the wait is logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.config import ModelConfig
from cluster.errors import CheckpointError, ConfigError
from cluster.logging_setup import get_logger

log = get_logger("engine.rank.loader")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUIRED_FILES = ("config.json",)
NF4_WIDTH_MULTIPLE = 64  # bitsandbytes' 4-bit kernels need in/out widths in multiples of 64


def resolve_checkpoint(config: ModelConfig) -> Path:
    """The local directory holding ``config``'s checkpoint (the tiny one is made on first use).

    Store versions are pulled into the cache and verified first; with ``lazy_load`` only
    their configs and tokenizer are pulled now, the weights on first request.
    """
    if config.checkpoint is None:
        if config.model_size != "tiny":
            raise ConfigError(
                f"checkpoint is not set for model_size={config.model_size!r}; point it to a "
                f"Llama 2 checkpoint directory in the Hugging Face layout or a store version",
                param="checkpoint",
            )
        from engine.tiny.checkpoint import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint()
    from cluster.checkpoints.resolve import ensure_local

    path = ensure_local(config.checkpoint, config.checkpoint_cache_dir, metadata_only=config.lazy_load)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not path.is_dir() or missing or not (weights or config.lazy_load):
        raise CheckpointError(
            f"checkpoint={str(path)!r} is not a Hugging Face checkpoint directory "
            f"(needs config.json and *.safetensors); make one with `m-ai checkpoint make-tiny DIR`",
            param="checkpoint",
        )
    return path


def _check_architecture(path: Path, config: ModelConfig) -> dict:
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "llama":
        raise CheckpointError(
            f"checkpoint {path.name!r} has model_type={hf.get('model_type')!r}; M-AI serves Llama 2 (llama)",
            param="checkpoint",
        )
    if config.context_length > hf.get("max_position_embeddings", config.context_length):
        raise ConfigError(
            f"context_length={config.context_length} is above the checkpoint's "
            f"max_position_embeddings={hf['max_position_embeddings']}; lower context_length",
            param="context_length",
        )
    return hf


# -- quantization -----------------------------------------------------------------------------


class _DropMessage(logging.Filter):
    """Drops one log message that bitsandbytes repeats on every 8-bit matmul."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_CAST_WARNING = "MatMul8bitLt: inputs will be cast"


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_CAST_WARNING))
        log.info("8-bit matmuls quantize activations through float16 (LLM.int8); expected, logged once")


def check_quantizable(config: ModelConfig, hf: dict) -> None:
    """Refuse what bitsandbytes cannot run, with the reason and the fix."""
    if config.quantization is None:
        return
    if config.quantization == "4bit":
        widths = {
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "key/value width": hf.get("num_key_value_heads", hf["num_attention_heads"])
            * (hf["hidden_size"] // hf["num_attention_heads"]),
        }
        bad = {k: v for k, v in widths.items() if v % NF4_WIDTH_MULTIPLE}
        if bad:
            raise ConfigError(
                f"quantization='4bit' needs layer widths that are multiples of {NF4_WIDTH_MULTIPLE}; this "
                f"checkpoint has {bad}; use quantization='8bit' or none",
                param="quantization",
            )


def _quantization_config(config: ModelConfig, dtype: torch.dtype):
    if config.quantization is None:
        return None
    try:
        import accelerate  # noqa: F401  (transformers needs it for bitsandbytes loading)
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"quantization={config.quantization!r} needs the bitsandbytes and accelerate packages "
            f"({exc.name} is missing); install them (pip install 'm-ai[gpu]') or set quantization: null",
            param="quantization",
        ) from None
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        _quiet_int8_cast_warning()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def model_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the weights take, quantization state included: ``total`` and ``linear`` (projections).

    ``linear`` counts the decoder layers' q/k/v/o/gate/up/down projections, the part that
    quantization compresses (8-bit row scales and 4-bit block absmax included).
    """
    seen: set[int] = set()

    def tensor_bytes(t: torch.Tensor | None) -> int:
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel() * t.element_size()

    def extra(param: torch.nn.Parameter) -> int:
        size = tensor_bytes(getattr(param, "SCB", None))  # 8-bit row scales
        state = getattr(param, "quant_state", None)  # 4-bit block state
        if state is not None:
            size += tensor_bytes(state.absmax) + tensor_bytes(state.code)
            nested = getattr(state, "state2", None)
            if nested is not None:
                size += tensor_bytes(nested.absmax) + tensor_bytes(nested.code)
        return size

    total = linear = 0
    for name, param in model.named_parameters():
        size = tensor_bytes(param) + extra(param)
        total += size
        if ".layers." in name and name.endswith("_proj.weight"):
            linear += size
    return {"total": total, "linear": linear}


# -- loading ----------------------------------------------------------------------------------


def disable_deepspeed_shm_allreduce() -> None:
    """Make DeepSpeed all-reduce through torch.distributed instead of its shm op.

    The op is compiled on first use (about 100 s, needs a compiler); gloo was as fast on the
    CPUs we measured. Must run before ``deepspeed.init_distributed``.
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def load_model(config: ModelConfig, path: Path, *, tp_size: int = 1) -> torch.nn.Module:
    """The model of ``path`` in ``config``'s dtype, sliced over ``tp_size`` ranks when > 1.

    For ``tp_size > 1`` the process group must already be initialised (``TPWorker`` does it).
    With ``config.lazy_load`` the weights are read on the first forward (see ``LazyWeights``).
    """
    hf = _check_architecture(path, config)
    check_quantizable(config, hf)
    if config.lazy_load:
        return _deferred_model(config, path, tp_size)
    return _load_now(config, path, tp_size)


def _load_now(config: ModelConfig, path: Path, tp_size: int) -> torch.nn.Module:
    if config.quantization is None:
        from engine.rank.slice_loader import load_rank_slices

        dtype = TORCH_DTYPES[config.resolved_dtype()]
        return load_rank_slices(path, dtype=dtype, device=config.resolved_device(), tp_size=tp_size)
    return load_full_then_slice(config, path, tp_size)


def load_full_then_slice(config: ModelConfig, path: Path, tp_size: int) -> torch.nn.Module:
    """The whole model through ``from_pretrained``, then DeepSpeed AutoTP (or bitsandbytes)."""
    from transformers import LlamaForCausalLM

    dtype = TORCH_DTYPES[config.resolved_dtype()]
    device = config.resolved_device()
    started = time.perf_counter()
    quantization = _quantization_config(config, dtype)
    if quantization is not None:
        # bitsandbytes quantizes while loading, straight onto the target device; no DeepSpeed.
        target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        model = LlamaForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map={"": target}
        )
    else:
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    if quantization is None and (tp_size > 1 or device == "cuda"):
        import deepspeed

        engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
        )
        model = engine.module
    elif quantization is None and device != "cpu":
        model.to(device)
    log.info(
        "model loaded",
        extra={
            "checkpoint": path.name,
            "dtype": str(dtype).removeprefix("torch."),
            "quantization": config.quantization or "none",
            "tp_size": tp_size,
            "rank": int(os.environ.get("RANK", 0)),
            "weight_mib": model_weight_bytes(model)["total"] >> 20,
            "load_s": round(time.perf_counter() - started, 2),
        },
    )
    return model


# -- lazy loading -----------------------------------------------------------------------------


@dataclass
class LazyWeights:
    """The state of a model whose weights are read on the first request."""

    config: ModelConfig
    path: Path
    tp_size: int
    skeleton: torch.nn.Module | None = None
    loaded: bool = False
    waited_s: float | None = None  # how long the first request waited for the weights

    def hook(self, module: torch.nn.Module, args) -> None:
        if self.loaded:
            return
        started = time.perf_counter()
        log.info("first request: loading weights now", extra={"checkpoint": self.path.name})
        if self.config.checkpoint is not None:
            from cluster.checkpoints.resolve import ensure_local

            # Completes a store version pulled with metadata only; a no-op otherwise.
            ensure_local(self.config.checkpoint, self.config.checkpoint_cache_dir)
        real = _load_now(self.config, self.path, self.tp_size)
        _adopt(self.skeleton, real)
        self.loaded = True
        self.waited_s = time.perf_counter() - started
        log.info(
            "weights loaded on first request",
            extra={"checkpoint": self.path.name, "waited_s": round(self.waited_s, 2)},
        )


def _deferred_model(config: ModelConfig, path: Path, tp_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(path))
    skeleton.eval()
    state = LazyWeights(config, path, tp_size, skeleton=skeleton)
    # The embedding is the first module of every forward: its pre-hook runs before any weight is used.
    skeleton.model.embed_tokens.register_forward_pre_hook(state.hook)
    skeleton.m_ai_lazy_weights = state
    log.info("weights deferred to the first request (lazy_load)", extra={"checkpoint": path.name})
    return skeleton


def lazy_weights(model: torch.nn.Module) -> LazyWeights | None:
    """The lazy-loading state of ``model`` (None for a model loaded eagerly)."""
    return getattr(model, "m_ai_lazy_weights", None)


def _adopt(skeleton: torch.nn.Module, real: torch.nn.Module) -> None:
    """Make the skeleton's modules become the loaded ones, in place.

    The model runner keeps references to the embedding, the decoder layers, the final norm,
    the rotary embedding and lm_head; each of those objects takes over the state (and the
    class: AutoTP and bitsandbytes swap layer types) of its loaded counterpart.
    """
    state = lazy_weights(skeleton)
    pairs = [
        (skeleton.model.embed_tokens, real.model.embed_tokens),
        (skeleton.model.norm, real.model.norm),
        (skeleton.model.rotary_emb, real.model.rotary_emb),
        (skeleton.lm_head, real.lm_head),
        *zip(skeleton.model.layers, real.model.layers),
        (skeleton.model, real.model),
        (skeleton, real),
    ]
    for old, new in pairs:
        old.__class__ = new.__class__
        old.__dict__ = new.__dict__
    skeleton.m_ai_lazy_weights = state
