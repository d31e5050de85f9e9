"""A memory shard's embeddings: the embedder (built on first use) and the sentence cache.

Every part of the shard that embeds (the API, the absorber, the summaries, the units, recall)
holds this object: ``embed`` runs the embedder in a worker thread so the event loop keeps
serving; ``embed_cached`` keeps recent summary sentences' vectors (summaries of summaries
reuse the same sentences); ``share_unit_vectors`` lends a one-sentence message's unit vector
to that cache, so it is not embedded twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.memory.episodic import ROLE_LABEL
from actors.memory.learning.extraction import split_sentences
from cluster.config.memory import MemoryConfig
from cluster.plugins import PluginRegistry
from engine.embedding.embedders import Embedder, build_embedder

SENTENCE_CACHE = 16_384


class ShardEmbeddings:
    """The embedder of one shard and its sentence cache (see the module docstring)."""

    def __init__(self, config: MemoryConfig, embedder: Embedder | None = None,
                 registry: PluginRegistry | None = None) -> None:
        self._config = config
        self._embedder = embedder
        self._registry = registry
        self._sentences: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            ref = self._config.embedder
            self._embedder = build_embedder(ref.name, ref.options, self._registry)
        return self._embedder

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embedder.embed, texts)

    async def embed_cached(self, texts: list[str]) -> np.ndarray:
        """Embeddings of summary sentences, recent ones from the cache (float16,
        ``SENTENCE_CACHE`` entries)."""
        cache = self._sentences
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for text, vector in zip(missing, await self.embed(missing)):
                cache[text] = vector.astype(np.float16)
        out = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = cache[text]
            cache.move_to_end(text)
        self._trim()
        return out

    def share_unit_vectors(self, units: Sequence[Any], vectors: np.ndarray) -> None:
        """A one-sentence message is also a summary candidate ("User: <sentence>"): its unit
        vector goes to the sentence cache."""
        cache = self._sentences
        for unit, vector in zip(units, vectors):
            sentences = split_sentences(unit.text)
            if len(sentences) == 1:
                key = f"{ROLE_LABEL.get(unit.role, 'User')}: {sentences[0]}"
                cache[key] = vector.astype(np.float16)
                cache.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        while len(self._sentences) > SENTENCE_CACHE:
            self._sentences.popitem(last=False)


__all__ = ["SENTENCE_CACHE", "ShardEmbeddings"]
