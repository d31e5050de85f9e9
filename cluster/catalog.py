"""The Llama 2 family as data: exact architectures of 7B, 13B, 70B and the project's tiny model.

Light and pure: no torch. ``engine`` turns an entry into a transformers ``LlamaConfig``.
Sizes are computed from the architecture (parameters, weight bytes in each precision, KV cache
bytes per token), so the device planner and the docs never carry a hand-copied number; a test
checks the counts against ``LlamaForCausalLM`` built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelSize = Literal["7B", "13B", "70B", "tiny", "small"]
ModelVariant = Literal["base", "chat"]
Quantization = Literal["8bit", "4bit"]

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes layouts, as transformers' BitsAndBytesConfig builds them (see engine/rank/loader.py):
# 8-bit (LLM.int8): one int8 per weight plus one float32 scale per output row;
# 4-bit NF4: two weights per byte plus one float32 absmax per block of 64 (no double quant).
# Embeddings, norms and lm_head stay in the compute dtype.
INT8_ROW_SCALE_BYTES = 4
NF4_BLOCK_SIZE = 64
NF4_ABSMAX_BYTES = 4


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one architecture by role; ``linear`` is what quantization compresses."""

    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int

    @property
    def linear(self) -> int:
        """Parameters of the decoder layers' linear projections (q, k, v, o, gate, up, down)."""
        return self.attention + self.mlp

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head


@dataclass(frozen=True)
class LlamaArchitecture:
    """The shape of one Llama 2 model (the fields of its Hugging Face ``config.json``)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each linear projection in one decoder layer."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        i = self.intermediate_size
        return {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    def parameter_counts(self) -> ParameterCounts:
        sizes = {name: o * i for name, (o, i) in self.linear_shapes().items()}
        attn = sum(sizes[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = sum(sizes[n] for n in ("gate_proj", "up_proj", "down_proj"))
        layers = self.num_hidden_layers
        return ParameterCounts(
            embedding=self.vocab_size * self.hidden_size,
            attention=attn * layers,
            mlp=mlp * layers,
            # two RMSNorms per layer and the final one
            norms=(2 * layers + 1) * self.hidden_size,
            lm_head=self.vocab_size * self.hidden_size,  # untied in Llama 2
        )

    @property
    def parameter_count(self) -> int:
        return self.parameter_counts().total

    def weight_bytes(self, dtype: str = "float16", quantization: str | None = None) -> int:
        """Bytes of the weights in ``dtype``, or quantized with ``dtype`` as the compute dtype."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        counts = self.parameter_counts()
        dense = DTYPE_BYTES[dtype]
        if quantization is None:
            return counts.total * dense
        rest = (counts.total - counts.linear) * dense
        if quantization == "8bit":
            rows = sum(o for o, _ in self.linear_shapes().values()) * self.num_hidden_layers
            return counts.linear + rows * INT8_ROW_SCALE_BYTES + rest
        if quantization == "4bit":
            blocks = -(-counts.linear // NF4_BLOCK_SIZE)
            return -(-counts.linear // 2) + blocks * NF4_ABSMAX_BYTES + rest
        raise ValueError(f"quantization={quantization!r} is unknown; use 8bit, 4bit or None")

    def kv_cache_bytes_per_token(self, dtype: str = "float16") -> int:
        """Keys and values of one token over all layers (grouped-query attention included)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * DTYPE_BYTES[dtype]

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        """Tensor-parallel sizes that divide both the attention and the key/value heads."""
        return [
            n for n in range(1, min(limit, self.num_key_value_heads) + 1)
            if self.num_attention_heads % n == 0 and self.num_key_value_heads % n == 0
        ]

    def hf_config_dict(self) -> dict:
        """The ``config.json`` of a ``LlamaForCausalLM`` with this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        }


LLAMA2_ARCHITECTURES: dict[str, LlamaArchitecture] = {
    "7B": LlamaArchitecture("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "13B": LlamaArchitecture("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    # 70B uses grouped-query attention: 8 key/value heads shared by 64 query heads.
    "70B": LlamaArchitecture("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    # Small enough for CPU tests; every width a multiple of 128 (4-bit kernels need 64);
    # grouped-query attention like 70B so that the general attention path is the tested one.
    "tiny": LlamaArchitecture("m-ai-tiny-llama", 256, 768, 4, 4, 2, 4096, max_position_embeddings=2048),
    # ~91M parameters with the tiny tokenizer: big enough that a CPU decode step is compute,
    # not Python (benchmarks); random weights like the tiny one (engine.small_checkpoint).
    "small": LlamaArchitecture("m-ai-small-llama", 768, 2048, 12, 12, 12, 4096, max_position_embeddings=2048),
}


@dataclass(frozen=True)
class ModelSpec:
    """One published model: a size in a variant, where its weights live, whether it is gated."""

    size: str
    variant: str
    name: str
    architecture: LlamaArchitecture
    hf_repo: str | None
    gated: bool

    @property
    def uses_chat_template(self) -> bool:
        return self.variant == "chat"


def _specs() -> dict[tuple[str, str], ModelSpec]:
    specs: dict[tuple[str, str], ModelSpec] = {}
    for size, arch in LLAMA2_ARCHITECTURES.items():
        for variant in ("base", "chat"):
            if size in ("tiny", "small"):
                name = f"m-ai-{size}" if variant == "chat" else f"m-ai-{size}-base"
                repo, gated = None, False  # made here (engine.tiny_checkpoint, small_checkpoint)
            else:
                suffix = "-chat" if variant == "chat" else ""
                name = f"llama-2-{size.lower()}{suffix}"
                # Meta's Hugging Face repositories; they need an accepted licence and a token.
                repo, gated = f"meta-llama/Llama-2-{size.lower()}{suffix}-hf", True
            specs[(size, variant)] = ModelSpec(size, variant, name, arch, repo, gated)
    return specs


LLAMA2_MODELS: dict[tuple[str, str], ModelSpec] = _specs()


def model_spec(size: str, variant: str = "chat") -> ModelSpec:
    """The published model of ``size`` in ``variant`` (base or chat)."""
    try:
        return LLAMA2_MODELS[(size, variant)]
    except KeyError:
        sizes = ", ".join(LLAMA2_ARCHITECTURES)
        raise KeyError(f"unknown model {size!r}/{variant!r}; sizes: {sizes}; variants: base, chat") from None


def architecture(size: str) -> LlamaArchitecture:
    """The architecture of ``size`` (7B, 13B, 70B or tiny)."""
    try:
        return LLAMA2_ARCHITECTURES[size]
    except KeyError:
        known = ", ".join(LLAMA2_ARCHITECTURES)
        raise KeyError(f"unknown model size {size!r}; known sizes: {known}") from None
