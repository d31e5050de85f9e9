"""The vector index of one user's live memories: exact below a threshold, HNSW above it.

Embeddings are stored quantized (``i8``: each unit-vector component times 127, rounded; or
``f16``; or ``f32``), which is what "compressed embeddings" means in docs/memory.md: an i8
vector of MiniLM is 384 bytes instead of 1,536. Below ``brute_force_below`` memories, search is
one matrix-vector product over the stored matrix (exact, no graph to maintain). From that
size on, a usearch HNSW graph (its own i8/f16/f32 copy) answers the nearest-neighbour query
and the candidates are re-scored exactly against the stored matrix; below half the threshold
the graph is dropped again (hysteresis). usearch was chosen because it is maintained, ships
wheels, supports removal and in-place quantization, and saves/restores its graph as one
byte buffer (docs/memory.md, "Vector index").
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cluster.config.memory import IndexConfig
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.recall.index")

_STORAGE = {"f32": np.float32, "f16": np.float16, "i8": np.int8}


def quantize(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Unit vectors (rows) in the storage ``dtype``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dtype == "i8":
        return np.clip(np.rint(vectors * 127.0), -127, 127).astype(np.int8)
    return vectors.astype(_STORAGE[dtype])


def dequantize(stored: np.ndarray) -> np.ndarray:
    """Float32 unit vectors back from the stored form."""
    vectors = stored.astype(np.float32)
    if stored.dtype == np.int8:
        vectors /= 127.0
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class VectorIndex:
    """Keys (int) -> stored vectors, searchable by cosine similarity."""

    def __init__(self, dimension: int, config: IndexConfig | None = None) -> None:
        self.dimension = dimension
        self.config = config or IndexConfig()
        self.dtype = self.config.embedding_dtype
        self._matrix = np.zeros((16, dimension), dtype=_STORAGE[self.dtype])
        self._inverse_norms = np.zeros(16, dtype=np.float32)
        self._keys = np.zeros(16, dtype=np.int64)
        self._rows: dict[int, int] = {}
        self._hnsw: Any = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in self._rows

    @property
    def uses_graph(self) -> bool:
        return self._hnsw is not None

    def keys(self) -> np.ndarray:
        return self._keys[: len(self._rows)].copy()

    def stored(self, key: int) -> np.ndarray:
        """The stored (quantized) vector of ``key``."""
        return self._matrix[self._rows[key]].copy()

    def vector(self, key: int) -> np.ndarray:
        return dequantize(self._matrix[self._rows[key]])

    # -- changes ----------------------------------------------------------------------------

    def add(self, key: int, vector: np.ndarray) -> None:
        """Add or replace ``key`` (``vector``: float32 unit vector)."""
        self.add_stored(key, quantize(np.asarray(vector, dtype=np.float32)[None, :], self.dtype)[0])

    def add_stored(self, key: int, stored: np.ndarray) -> None:
        """Add or replace ``key`` with an already quantized vector (loading from storage)."""
        if key in self._rows:
            self.remove(key)
        row = len(self._rows)
        if row == len(self._keys):
            self._grow()
        self._matrix[row] = stored
        norm = float(np.linalg.norm(stored.astype(np.float32)))
        self._inverse_norms[row] = 1.0 / norm if norm > 0 else 0.0
        self._keys[row] = key
        self._rows[key] = row
        if self._hnsw is not None:
            self._hnsw.add(key, dequantize(stored), threads=1)
        else:
            self.ensure_graph()

    def refine(self, key: int, vector: np.ndarray) -> None:
        """Set ``key``'s vector (float32, unit) in place, or add it when new. The graph keeps
        the vector the key was added with: it only proposes candidates, which are scored
        against the stored matrix, so a vector that moves a little (a unit's contextual vector
        as its neighbours arrive) costs no graph removal and insertion."""
        row = self._rows.get(key)
        if row is None:
            self.add(key, vector)
            return
        stored = quantize(np.asarray(vector, dtype=np.float32)[None, :], self.dtype)[0]
        self._matrix[row] = stored
        norm = float(np.linalg.norm(stored.astype(np.float32)))
        self._inverse_norms[row] = 1.0 / norm if norm > 0 else 0.0

    def add_many_stored(self, keys: np.ndarray, stored: np.ndarray, build_graph: bool = True) -> None:
        """Bulk load into an empty index; the graph (if the size calls for one) is built once
        at the end unless ``build_graph`` is False (a saved graph is restored instead)."""
        if len(self._rows):
            raise RuntimeError("add_many_stored loads an empty index only")
        n = len(keys)
        while len(self._keys) < n:
            self._grow()
        self._matrix[:n] = stored
        norms = np.linalg.norm(np.asarray(stored, dtype=np.float32), axis=1)
        self._inverse_norms[:n] = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0)
        self._keys[:n] = keys
        self._rows = {int(key): row for row, key in enumerate(np.asarray(keys).tolist())}
        if build_graph:
            self.ensure_graph()

    def ensure_graph(self) -> None:
        """Build the graph when the index is large enough and has none."""
        if self._hnsw is None and self._wants_graph():
            self._build_graph()

    def remove(self, key: int) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        last = len(self._rows)
        if row != last:  # keep rows dense: the last one fills the hole
            moved = int(self._keys[last])
            self._matrix[row] = self._matrix[last]
            self._inverse_norms[row] = self._inverse_norms[last]
            self._keys[row] = moved
            self._rows[moved] = row
        if self._hnsw is not None:
            self._hnsw.remove(key)
            if len(self._rows) < self.config.brute_force_below // 2:
                self._hnsw = None
        return True

    def _grow(self) -> None:
        size = len(self._keys) * 2
        matrix = np.zeros((size, self.dimension), dtype=self._matrix.dtype)
        matrix[: len(self._keys)] = self._matrix
        norms = np.zeros(size, dtype=np.float32)
        norms[: len(self._keys)] = self._inverse_norms
        keys = np.zeros(size, dtype=np.int64)
        keys[: len(self._keys)] = self._keys
        self._matrix, self._inverse_norms, self._keys = matrix, norms, keys

    def _wants_graph(self) -> bool:
        below = self.config.brute_force_below
        return below > 0 and len(self._rows) >= below

    def _new_graph(self) -> Any:
        from usearch.index import Index

        return Index(
            ndim=self.dimension,
            metric="cos",
            dtype=self.dtype,
            connectivity=self.config.connectivity,
            expansion_add=self.config.expansion_add,
            expansion_search=self.config.expansion_search,
        )

    def _build_graph(self) -> None:
        n = len(self._rows)
        graph = self._new_graph()
        if n:
            # One thread: the memory actor owns one CPU; more threads only contend.
            graph.add(self._keys[:n].astype(np.uint64), dequantize(self._matrix[:n]), threads=1)
        self._hnsw = graph
        log.debug("HNSW graph built", extra={"memories": n})

    # -- search -----------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest keys with their cosine similarity, best first."""
        n = len(self._rows)
        if n == 0 or k <= 0:
            return []
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if self._hnsw is not None:
            matches = self._hnsw.search(query, min(k, n), threads=1)
            rows = np.fromiter((self._rows[int(key)] for key in matches.keys), dtype=np.int64)
        else:
            rows = np.arange(n)
        sims = (self._matrix[rows].astype(np.float32) @ query) * self._inverse_norms[rows]
        if self._hnsw is None and k < n:
            top = np.argpartition(-sims, k - 1)[:k]
        else:
            top = np.arange(len(rows))
        top = top[np.argsort(-sims[top], kind="stable")][:k]
        return [(int(self._keys[rows[i]]), float(sims[i])) for i in top]

    # -- persistence and accounting ---------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of the stored vectors plus the graph (usearch's own figure)."""
        total = len(self._rows) * (self._matrix.itemsize * self.dimension + 12)
        if self._hnsw is not None:
            total += int(getattr(self._hnsw, "memory_usage", 0) or 0)
        return total

    def snapshot(self) -> tuple[dict[int, int], np.ndarray]:
        """A copy of (key -> row, stored matrix) that later changes do not touch."""
        n = len(self._rows)
        return dict(self._rows), self._matrix[:n].copy()

    def keys_digest(self) -> str:
        keys = np.sort(self._keys[: len(self._rows)])
        return hashlib.sha256(keys.tobytes()).hexdigest()[:32]

    def graph_bytes(self) -> bytes | None:
        """The HNSW graph as one buffer (None without a graph)."""
        if self._hnsw is None:
            return None
        return bytes(self._hnsw.save())

    def restore_graph(self, data: bytes) -> bool:
        """Use a saved graph if it holds exactly the current keys; False means rebuild."""
        from usearch.index import Index

        try:
            graph = Index.restore(bytearray(data))
        except Exception as exc:  # corrupt or foreign buffer: rebuild instead
            log.warning("saved HNSW graph unreadable; rebuilding", extra={"error": str(exc)})
            return False
        if graph is None or len(graph) != len(self._rows) or graph.ndim != self.dimension:
            return False
        saved = np.sort(np.asarray(graph.keys, dtype=np.int64))
        if not np.array_equal(saved, np.sort(self._keys[: len(self._rows)])):
            return False
        graph.expansion_search = self.config.expansion_search
        self._hnsw = graph
        return True


__all__ = ["VectorIndex", "quantize", "dequantize"]
