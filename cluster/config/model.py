"""One served model's configuration: what to load, how to split it over ranks, sampling defaults.

Every validation error names the field, the value and the fix (``config_error``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.catalog import architecture
from cluster.config.hints import closest, fields_at, unknown_field_hint
from cluster.errors import ConfigError

# Fields that a running replica can take without reloading weights (``reconfigure``).
LIVE_FIELDS = frozenset({"temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_URI_SCHEMES = ("file", "s3", "gs", "gcs", "hf")
_REFERENCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9._-]+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ModelConfig(_Frozen):
    """One served Llama 2 model: what to load, how to run it, and its sampling defaults."""

    name: str | None = Field(
        None, description="Name clients use in the `model` field; defaults to e.g. `llama-2-7b-chat`."
    )
    model_size: Literal["7B", "13B", "70B", "tiny", "small"] = Field(
        "tiny", description="Llama 2 size; `tiny` is the project's own small CPU checkpoint, `small` "
        "a ~91M-parameter one for benchmarks (needs `checkpoint`, see engine/tiny/small_checkpoint.py)."
    )
    model_variant: Literal["base", "chat"] = Field(
        "chat", description="`chat` models use the Llama 2 chat template ([INST], <<SYS>>)."
    )
    quantization: Literal["8bit", "4bit"] | None = Field(
        None, description="Weight quantization through bitsandbytes; None keeps `dtype` weights."
    )
    checkpoint: str | None = Field(
        None,
        description="Directory or URI (file://, s3://, gs://) of a Hugging Face layout checkpoint. "
        "None for `tiny` means the embedded checkpoint, made on first use.",
    )
    checkpoint_cache_dir: str | None = Field(
        None,
        description="Local directory that store and Hub checkpoints are pulled into and verified in; "
        "None is ~/.cache/m-ai/checkpoints.",
    )
    lazy_load: bool = Field(
        False,
        description="Start without weights in memory and load them on the first request (that request "
        "waits; the wait is logged). A store version's weights are also pulled then.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations; `auto` is float32 on CPU, float16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` picks CUDA when present, else the CPU."
    )
    tp_size: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks (GPUs or CPU processes).")
    cpu_threads_per_rank: int = Field(
        1, ge=1, le=256, description="torch threads per CPU rank; more than one per core slows decode."
    )
    replace_with_kernel_inject: bool = Field(
        False,
        description="Must stay false: DeepSpeed's fused kernels keep the KV cache in their own static "
        "workspace, which cannot coexist with the engine's cache (see docs/engine.md).",
    )
    context_length: int = Field(
        2048, ge=16, description="Tokens of prompt plus output one sequence may hold."
    )
    max_num_seqs: int = Field(32, ge=1, le=4096, description="Sequences in the running batch at most.")
    max_batched_tokens: int = Field(
        2048, ge=1, description="Tokens processed in one engine step (decode + prefill chunks)."
    )
    kv_block_size: int = Field(
        16, ge=1, le=1024,
        description="Tokens per KV-cache block (the paged cache's unit of allocation and of prefix sharing).",
    )
    kv_cache_blocks: int | None = Field(
        None, ge=1,
        description="Blocks in the KV-cache pool of each rank; None keeps room for max_num_seqs + 4 "
        "full-length sequences. `m-ai plan` sizes it from the device's free memory.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Keep full KV blocks after their requests end, keyed by their token prefix, and "
        "share them with later prompts that start the same way (conversations, system prompts).",
    )
    kv_watermark: float = Field(
        0.01, ge=0.0, lt=1.0,
        description="Fraction of the KV blocks a new request may not take, left for running "
        "sequences to grow into (fewer preemptions).",
    )
    max_queued_requests: int = Field(
        1024, ge=0, description="Requests waiting beyond the running batch before new ones are refused."
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, description="Default nucleus sampling mass, in (0, 1].")
    top_k: int = Field(0, ge=0, description="Default top-k; 0 disables it.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1.0 disables it.")
    max_tokens: int = Field(256, ge=1, description="Default output tokens per request.")
    seed: int | None = Field(None, description="Default sampling seed; None draws one per request.")

    def resolved_kv_cache_blocks(self) -> int:
        """The KV pool's blocks per rank: ``kv_cache_blocks``, or max_num_seqs + 4 sequences."""
        if self.kv_cache_blocks is not None:
            return self.kv_cache_blocks
        return (self.max_num_seqs + 4) * -(-self.context_length // self.kv_block_size)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not _NAME_RE.match(value):
            raise ValueError(
                f"name={value!r} is not a valid model name; use 1-128 letters, digits and . _ : / -"
            )
        return value

    @field_validator("checkpoint")
    @classmethod
    def _check_checkpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value or "\x00" in value:
            raise ValueError(f"checkpoint={value!r} is empty or contains NUL; give a directory or URI")
        scheme = value.split("://", 1)[0] if "://" in value else None
        if scheme is not None:
            if scheme not in _URI_SCHEMES:
                raise ValueError(
                    f"checkpoint={value!r} has scheme {scheme!r}; use one of {', '.join(_URI_SCHEMES)} or a path"
                )
            return value
        if _REFERENCE_RE.match(value):  # name@version in the checkpoint store, not a path
            return value
        return str(Path(os.path.expanduser(value)).resolve())

    @field_validator("checkpoint_cache_dir")
    @classmethod
    def _check_cache_dir(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value or "://" in value or "\x00" in value:
            raise ValueError(
                f"checkpoint_cache_dir={value!r} must be a local directory path (the cache is on local disk)"
            )
        return str(Path(os.path.expanduser(value)).resolve())

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"top_p={value} is not in (0, 1]; use e.g. top_p=0.9, or 1.0 to disable it")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelConfig:
        arch = architecture(self.model_size)
        if self.context_length > arch.max_position_embeddings:
            raise ValueError(
                f"context_length={self.context_length} is above the {arch.max_position_embeddings} "
                f"tokens {arch.name} was trained for; set context_length <= {arch.max_position_embeddings}"
            )
        if self.max_tokens > self.context_length:
            raise ValueError(
                f"max_tokens={self.max_tokens} is above context_length={self.context_length}; "
                f"lower max_tokens or raise context_length"
            )
        if self.max_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_batched_tokens={self.max_batched_tokens} is below max_num_seqs={self.max_num_seqs}: "
                f"a full batch could not decode one token each; raise max_batched_tokens to >= {self.max_num_seqs}"
            )
        heads, kv_heads = arch.num_attention_heads, arch.num_key_value_heads
        if heads % self.tp_size or kv_heads % self.tp_size:
            valid = [n for n in range(1, kv_heads + 1) if kv_heads % n == 0 and heads % n == 0]
            raise ValueError(
                f"tp_size={self.tp_size} does not divide the {heads} attention and {kv_heads} key/value "
                f"heads of {arch.name}; use one of {valid}"
            )
        if self.quantization and self.tp_size > 1:
            raise ValueError(
                f"quantization={self.quantization!r} with tp_size={self.tp_size}: quantized weights are "
                f"not split by DeepSpeed AutoTP; use tp_size=1 (one quantized replica per GPU)"
            )
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype='float16' with device='cpu': CPUs run float32 or bfloat16; set dtype")
        if self.replace_with_kernel_inject:
            raise ValueError(
                "replace_with_kernel_inject=True is not supported: DeepSpeed's fused kernels keep the "
                "KV cache in their own static workspace, which cannot coexist with the engine's cache "
                "(iteration-level batching, prefix caching); leave replace_with_kernel_inject false "
                "(DeepSpeed AutoTP splits the model without it)"
            )
        return self

    # -- derived values ---------------------------------------------------------------------

    @property
    def served_name(self) -> str:
        """The ``model`` name clients send."""
        if self.name:
            return self.name
        if self.model_size in ("tiny", "small"):
            base = f"m-ai-{self.model_size}"
            return base if self.model_variant == "chat" else f"{base}-base"
        suffix = "-chat" if self.model_variant == "chat" else ""
        return f"llama-2-{self.model_size.lower()}{suffix}"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.resolved_device() == "cuda" else "float32"



# -- errors ---------------------------------------------------------------------------------


def config_error(
    exc: ValidationError, source: str = "config", root: type[BaseModel] | None = None
) -> ConfigError:
    """A ``ConfigError`` whose message lists each bad field with its value and the fix; an
    unknown field (of ``root``'s tree) gets the closest known name (``did you mean ...?``)."""
    lines = []
    first_field = None
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden" and err["loc"]:
            known = fields_at(root, err["loc"][:-1]) if root is not None else None
            first_field = first_field or loc
            lines.append(
                f"{loc}: unknown field (got {err.get('input')!r:.60}); "
                f"{unknown_field_hint(str(err['loc'][-1]), known)}"
            )
            continue
        named = re.match(r"^(\w+)=", msg)
        if named and loc.rsplit(".", 1)[-1] != named.group(1):
            # cross-field checks start with the field they blame
            loc = f"{loc}.{named.group(1)}" if loc else named.group(1)
        loc = loc or "(root)"
        first_field = first_field or loc
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(msg if named else f"{loc}: {msg}{shown}")
    return ConfigError(f"invalid {source}: " + "; ".join(lines), param=first_field)


def build_model_config(**fields: Any) -> ModelConfig:
    """``ModelConfig(**fields)`` raising ``ConfigError`` instead of pydantic's error."""
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise config_error(exc, "model config", ModelConfig) from None


# -- live updates ---------------------------------------------------------------------------


class ConfigUpdate(BaseModel):
    """The outcome of ``plan_update``: the new config and which changed fields apply how."""

    model_config = ConfigDict(frozen=True)

    config: ModelConfig
    live: tuple[str, ...] = Field(description="Changed fields applied to running replicas at once.")
    reload: tuple[str, ...] = Field(description="Changed fields that need the weights reloaded.")

    @property
    def needs_reload(self) -> bool:
        return bool(self.reload)


def plan_update(current: ModelConfig, changes: dict[str, Any]) -> ConfigUpdate:
    """Validate ``changes`` against ``current`` and sort them into live and reload fields."""
    unknown = sorted(set(changes) - set(ModelConfig.model_fields))
    if unknown:
        known = sorted(ModelConfig.model_fields)
        suggestion = closest(unknown[0], known)
        hint = f"did you mean `{suggestion}`? " if suggestion else ""
        raise ConfigError(
            f"unknown model config fields {unknown}; {hint}known: {known}",
            param=unknown[0],
        )
    new = build_model_config(**{**current.model_dump(), **changes})
    changed = [k for k in changes if getattr(new, k) != getattr(current, k)]
    live = tuple(k for k in changed if k in LIVE_FIELDS)
    reload = tuple(k for k in changed if k not in LIVE_FIELDS)
    return ConfigUpdate(config=new, live=live, reload=reload)
