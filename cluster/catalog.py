"""The Llama 2 family as data: exact architectures of 7B, 13B, 70B and the project's tiny model.

Light and pure: no torch. ``engine`` turns an entry into a transformers ``LlamaConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelSize = Literal["7B", "13B", "70B", "tiny"]


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
}


def architecture(size: str) -> LlamaArchitecture:
    """The architecture of ``size`` (7B, 13B, 70B or tiny)."""
    try:
        return LLAMA2_ARCHITECTURES[size]
    except KeyError:
        known = ", ".join(LLAMA2_ARCHITECTURES)
        raise KeyError(f"unknown model size {size!r}; known sizes: {known}") from None
