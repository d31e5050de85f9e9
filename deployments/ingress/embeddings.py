"""``POST /v1/embeddings``: the memory's embedder (all-MiniLM-L6-v2 by default) served under
its own model name.

Each ingress replica loads the embedder on the first embeddings request (in a thread; the
MiniLM weights are ~90 MB) and runs batches in a thread, so the event loop keeps serving.
Vectors are L2-normalised float32, as the memory stores them; ``encoding_format=base64``
sends their little-endian float32 bytes in base64 (what the official SDK asks for by default
and decodes). ``usage`` counts the embedder's own tokens (words for an embedder without a
tokenizer).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import numpy as np

from cluster.config.memory import MemoryConfig
from cluster.errors import InvalidRequestError, ModelNotFoundError
from deployments.protocol_responses import EmbeddingRequest


class EmbeddingService:
    """The embedding model of one ingress replica (loaded on first use)."""

    def __init__(self, memory: MemoryConfig | None) -> None:
        self.ref = (memory or MemoryConfig()).embedder
        self._embedder: Any = None
        self._lock = threading.Lock()
        self.model_name = _model_name(self.ref.name)

    def _load(self) -> Any:
        with self._lock:
            if self._embedder is None:
                from engine.embedding.embedders import build_embedder

                self._embedder = build_embedder(self.ref.name, dict(self.ref.options))
            return self._embedder

    def card(self) -> dict[str, Any]:
        return {"id": self.model_name, "created": 0, "owned_by": "m-ai"}

    async def embed(self, request: EmbeddingRequest) -> dict[str, Any]:
        if request.model != self.model_name:
            raise ModelNotFoundError(  # 404, as OpenAI answers an unknown model
                f"model={request.model!r} is not an embedding model here; use {self.model_name!r}",
                param="model",
            )
        embedder = self._embedder or await asyncio.to_thread(self._load)
        if request.dimensions is not None and request.dimensions != embedder.dimension:
            raise InvalidRequestError(
                f"dimensions={request.dimensions}: {self.model_name} has {embedder.dimension} "
                "dimensions and cannot shorten them; leave dimensions out",
                param="dimensions",
            )
        texts = request.texts
        vectors, tokens = await asyncio.to_thread(self._run, embedder, texts)
        data = []
        for index, vector in enumerate(vectors):
            if request.encoding_format == "base64":
                value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.astype(np.float32).tolist()
            data.append({"object": "embedding", "index": index, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @staticmethod
    def _run(embedder: Any, texts: list[str]) -> tuple[np.ndarray, int]:
        vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
        tokenizer = getattr(embedder, "_tokenizer", None)
        if tokenizer is not None:
            max_length = getattr(embedder, "max_length", 512)
            tokens = sum(min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"])
        else:
            tokens = sum(len(t.split()) for t in texts)
        return vectors, tokens


def _model_name(embedder: str) -> str:
    return "all-MiniLM-L6-v2" if embedder == "minilm" else embedder


__all__ = ["EmbeddingService"]
