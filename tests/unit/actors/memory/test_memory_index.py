"""The vector index: exact below the threshold, HNSW above, quantized storage, saved graphs."""

from __future__ import annotations

import numpy as np
import pytest

from actors.memory.recall.index import VectorIndex, dequantize, quantize
from cluster.config.memory import IndexConfig


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-6), ("f16", 2e-3), ("i8", 2e-2)])
def test_quantized_storage_keeps_cosine_close(dtype, tolerance):
    v = unit_vectors(50)
    back = dequantize(quantize(v, dtype))
    exact = v @ v.T
    assert np.abs(back @ back.T - exact).max() < tolerance
    assert quantize(v, dtype).nbytes == v.nbytes * {"f32": 1, "f16": 0.5, "i8": 0.25}[dtype]


def test_exact_search_matches_numpy_and_handles_removal():
    v = unit_vectors(300)
    index = VectorIndex(32, IndexConfig(brute_force_below=0, embedding_dtype="f32"))
    for key, vector in enumerate(v, start=10):
        index.add(key, vector)
    query = unit_vectors(1, seed=9)[0]
    expected = np.argsort(-(v @ query))[:5] + 10
    found = index.search(query, 5)
    assert [k for k, _ in found] == expected.tolist()
    assert found[0][1] == pytest.approx(float(v[expected[0] - 10] @ query), abs=1e-5)
    assert index.remove(int(expected[0])) and not index.remove(int(expected[0]))
    assert [k for k, _ in index.search(query, 4)] == expected[1:5].tolist()
    assert len(index) == 299 and not index.uses_graph
    index.add(11, v[0])  # replacing a key keeps one copy
    assert len(index) == 299


def test_graph_above_threshold_finds_members_and_drops_below_half():
    v = unit_vectors(600)
    index = VectorIndex(32, IndexConfig(brute_force_below=400))
    for key, vector in enumerate(v):
        index.add(key, vector)
        assert index.uses_graph == (key + 1 >= 400)
    hits = sum(index.search(v[i], 1)[0][0] == i for i in range(0, 600, 5))
    assert hits >= 118  # of 120: HNSW on members
    for key in range(450):
        index.remove(key)
    assert len(index) == 150 and not index.uses_graph  # below half the threshold: exact again
    assert index.search(v[500], 1)[0][0] == 500


def test_saved_graph_is_used_only_when_it_holds_the_same_keys():
    v = unit_vectors(500)
    config = IndexConfig(brute_force_below=100)
    index = VectorIndex(32, config)
    index.add_many_stored(np.arange(500), quantize(v, "i8"))
    assert index.uses_graph
    data = index.graph_bytes()
    assert data is not None

    copy = VectorIndex(32, config)
    copy.add_many_stored(index.keys(), np.stack([index.stored(k) for k in index.keys()]), build_graph=False)
    assert not copy.uses_graph and copy.restore_graph(data) and copy.uses_graph
    assert copy.search(v[42], 1)[0][0] == 42

    other = VectorIndex(32, config)
    other.add_many_stored(np.arange(499), quantize(v[:499], "i8"), build_graph=False)
    assert not other.restore_graph(data)  # one key fewer: rebuild instead
    assert not other.restore_graph(b"not a graph")
    other.ensure_graph()
    assert other.uses_graph
    assert index.keys_digest() != other.keys_digest()


def test_bytes_account_for_vectors_and_graph():
    v = unit_vectors(200)
    small = VectorIndex(32, IndexConfig(brute_force_below=0, embedding_dtype="i8"))
    big = VectorIndex(32, IndexConfig(brute_force_below=0, embedding_dtype="f32"))
    for key, vector in enumerate(v):
        small.add(key, vector)
        big.add(key, vector)
    assert small.nbytes() < big.nbytes()
    graph = VectorIndex(32, IndexConfig(brute_force_below=50, embedding_dtype="i8"))
    graph.add_many_stored(np.arange(200), quantize(v, "i8"))
    assert graph.nbytes() > small.nbytes()


def test_a_refined_vector_is_scored_as_it_is_now_without_touching_the_graph():
    v = unit_vectors(200)
    index = VectorIndex(32, IndexConfig(brute_force_below=100, embedding_dtype="f32"))
    for key, vector in enumerate(v):
        index.add(key, vector)
    assert index.uses_graph
    moved = v[7] + 0.3 * v[8]
    moved /= np.linalg.norm(moved)
    index.refine(7, moved)
    assert len(index) == 200 and np.allclose(index.vector(7), moved, atol=1e-6)
    hit = dict(index.search(moved, 5))
    assert hit[7] == pytest.approx(1.0, abs=1e-5)  # the graph still proposes it; the score is the new vector's
    index.refine(500, v[0])  # a new key is added
    assert len(index) == 201 and 500 in index
