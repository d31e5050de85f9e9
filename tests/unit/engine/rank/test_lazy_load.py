"""Lazy loading: a replica starts without weights and reads them on its first request."""

from __future__ import annotations

import logging

import pytest

from cluster.checkpoints.store import CheckpointStore
from cluster.config import ModelConfig
from engine.engine import LLMEngine
from engine.rank.loader import lazy_weights, resolve_checkpoint
from engine.types import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def config(checkpoint, **overrides) -> ModelConfig:
    fields = dict(model_size="tiny", checkpoint=str(checkpoint), dtype="float32", device="cpu",
                  max_num_seqs=4, max_batched_tokens=256, context_length=256, max_tokens=32)
    fields.update(overrides)
    return ModelConfig(**fields)


def model_of(engine: LLMEngine):
    return engine.core.worker.runner.model


@pytest.fixture(scope="module")
def eager_tokens(tiny_checkpoint):
    with LLMEngine.from_config(config(tiny_checkpoint)) as engine:
        prompt = engine.tokenizer.encode("Hello there, how are you today?")
        return prompt, engine.generate_text(prompt, GREEDY).token_ids


def test_weights_are_read_on_the_first_request_and_the_wait_is_logged(tiny_checkpoint, eager_tokens, caplog):
    prompt, want = eager_tokens
    with caplog.at_level(logging.INFO, logger="m_ai.engine.rank.loader"):
        with LLMEngine.from_config(config(tiny_checkpoint, lazy_load=True)) as engine:
            state = lazy_weights(model_of(engine))
            assert state is not None and not state.loaded
            assert model_of(engine).model.embed_tokens.weight.is_meta  # nothing read yet
            assert engine.generate_text(prompt, GREEDY).token_ids == want
            assert state.loaded and state.waited_s > 0
            assert not model_of(engine).model.embed_tokens.weight.is_meta
            assert engine.generate_text(prompt, GREEDY).token_ids == want  # loaded once, reused
    loaded = [r for r in caplog.records if r.getMessage() == "weights loaded on first request"]
    assert len(loaded) == 1 and loaded[0].waited_s == pytest.approx(state.waited_s, abs=0.01)


def test_a_store_version_pulls_only_metadata_at_start_and_weights_on_first_request(
    tiny_checkpoint, eager_tokens, tmp_path
):
    prompt, want = eager_tokens
    store = CheckpointStore.from_uri(tmp_path / "store")
    store.publish(tiny_checkpoint, "tiny@v1")
    cfg = config(store.ref_uri(store.manifest("tiny@v1").ref), lazy_load=True, checkpoint_cache_dir=str(tmp_path / "cache"))
    path = resolve_checkpoint(cfg)
    assert (path / "config.json").is_file() and (path / "tokenizer.model").is_file()
    assert not (path / "model.safetensors").exists()
    with LLMEngine.from_config(cfg) as engine:
        assert not (path / "model.safetensors").exists()
        assert engine.generate_text(prompt, GREEDY).token_ids == want
    assert (path / "model.safetensors").is_file()
    assert CheckpointStore.local_cache(tmp_path / "cache").has(store.manifest("tiny@v1").ref)


def test_eager_loading_from_a_store_version(tiny_checkpoint, eager_tokens, tmp_path):
    prompt, want = eager_tokens
    store = CheckpointStore.from_uri(tmp_path / "store")
    ref = store.publish(tiny_checkpoint, "tiny@v1").ref
    cfg = config(store.ref_uri(ref), checkpoint_cache_dir=str(tmp_path / "cache"))
    with LLMEngine.from_config(cfg) as engine:
        assert engine.generate_text(prompt, GREEDY).token_ids == want
