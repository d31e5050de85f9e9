"""Load a Llama 2 checkpoint directory (Hugging Face layout) and shard it.

Weights are read by transformers from safetensors (memory-mapped, the model built on the meta
device first), so several shards on one host share the page cache. Tensor parallelism and
quantization are applied after construction: the model code stays model code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from cluster.config import ModelConfig
from cluster.errors import CheckpointError, ConfigError
from cluster.logging_setup import get_logger

log = get_logger("engine.loader")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUIRED_FILES = ("config.json",)


def resolve_checkpoint(config: ModelConfig) -> Path:
    """The local directory holding ``config``'s checkpoint (the tiny one is made on first use)."""
    if config.checkpoint is None:
        if config.model_size != "tiny":
            raise ConfigError(
                f"checkpoint is not set for model_size={config.model_size!r}; point it to a "
                f"Llama 2 checkpoint directory in the Hugging Face layout",
                param="checkpoint",
            )
        from engine.tiny_checkpoint import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint()
    location = config.checkpoint
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        raise CheckpointError(
            f"checkpoint={config.checkpoint!r}: remote checkpoints are not loaded directly; "
            f"copy the checkpoint to a local directory and point `checkpoint` at it",
            param="checkpoint",
        )
    path = Path(location)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not path.is_dir() or missing or not weights:
        raise CheckpointError(
            f"checkpoint={str(path)!r} is not a Hugging Face checkpoint directory "
            f"(needs config.json and *.safetensors); make one with `m-ai checkpoint make-tiny DIR`",
            param="checkpoint",
        )
    return path


def _check_architecture(path: Path, config: ModelConfig) -> None:
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


def _quantization_config(config: ModelConfig, dtype: torch.dtype):
    if config.quantization is None:
        return None
    from transformers import BitsAndBytesConfig  # needs the `bitsandbytes` package (extra: gpu)

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )


def disable_deepspeed_shm_allreduce() -> None:
    """Make DeepSpeed all-reduce through torch.distributed instead of its shm op.

    The op is compiled on first use (about 100 s, needs a compiler); gloo was as fast on the
    CPUs we measured. Must run before ``deepspeed.init_distributed``.
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def load_model(config: ModelConfig, path: Path, *, tp_size: int = 1) -> torch.nn.Module:
    """The model of ``path`` in ``config``'s dtype, sharded over ``tp_size`` ranks when > 1.

    For ``tp_size > 1`` the process group must already be initialised (``TPWorker`` does it).
    """
    from transformers import LlamaForCausalLM

    _check_architecture(path, config)
    dtype = TORCH_DTYPES[config.resolved_dtype()]
    device = config.resolved_device()
    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=_quantization_config(config, dtype)
    )
    model.eval()
    if tp_size > 1 or config.replace_with_kernel_inject or device == "cuda":
        import deepspeed

        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": tp_size},
            dtype=dtype,
            replace_with_kernel_inject=config.replace_with_kernel_inject,
        )
        model = engine.module
        layer = model.model.layers[0]
        if not hasattr(layer, "self_attn"):
            # Injected fused layers keep their own KV cache for static batches; the
            # continuous-batching runner needs the decoder layers' own projections.
            raise ConfigError(
                "replace_with_kernel_inject=True replaced the decoder layers with fused kernels "
                "that keep their own static-batch KV cache; iteration-level batching needs "
                "replace_with_kernel_inject=False (AutoTP)",
                param="replace_with_kernel_inject",
            )
    elif device != "cpu":
        model.to(device)
    log.info(
        "model loaded",
        extra={
            "checkpoint": path.name,
            "dtype": str(dtype).removeprefix("torch."),
            "tp_size": tp_size,
            "rank": int(os.environ.get("RANK", 0)),
            "load_s": round(time.perf_counter() - started, 2),
        },
    )
    return model
