"""MemoryConfig: defaults, plugin references, cross-field checks that name both values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config.memory import MemoryConfig


def test_defaults_are_the_cpu_friendly_choices():
    config = MemoryConfig()
    assert (config.embedder.name, config.summarizer, config.extractor) == ("minilm", "extractive", "rules")
    assert config.storage_uri is None and config.index.embedding_dtype == "i8"
    with pytest.raises(ValidationError):
        MemoryConfig(shards=0)


def test_embedder_takes_a_bare_name_or_a_reference_with_options():
    assert MemoryConfig(embedder="hashing").embedder.name == "hashing"
    ref = MemoryConfig(embedder={"name": "my-embedder", "options": {"dimension": 64}}).embedder
    assert (ref.name, ref.options) == ("my-embedder", {"dimension": 64})
    # minilm's precision is checked here; another embedder's options are its own business
    assert MemoryConfig(embedder={"name": "minilm", "options": {"precision": "fp32"}}).embedder.options == {
        "precision": "fp32"}
    assert MemoryConfig(embedder={"name": "e5", "options": {"precision": "int8"}}).embedder.name == "e5"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"retrieval": {"top_k": 10, "candidates": 5}}, "candidates=5 is below top_k=10"),
        ({"context": {"long_term_share": 0.7, "episodic_share": 0.5}}, "long_term_share=0.7 plus episodic_share=0.5"),
        ({"storage_uri": "  "}, "storage_uri="),
        ({"extractor": "magic"}, "extractor"),
        ({"embedder": {"name": "minilm", "options": {"precision": "int8"}}},
         r"precision='int8' is not one of auto, fp32, fp16"),
        ({"embedder": {"name": "minilm", "options": {"batch_precision": "fp8"}}},
         r"batch_precision='fp8' is not one of auto, bf16, same"),
        ({"embedder": {"name": "minilm", "options": {"threads": 0}}},
         r"threads=0 is not a positive whole number"),
        ({"embedder": {"name": "minilm", "options": {"threads": "two"}}},
         r"threads='two' is not a positive whole number"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_values_are_refused_naming_them(fields, message):
    with pytest.raises(ValidationError, match=message):
        MemoryConfig(**fields)
