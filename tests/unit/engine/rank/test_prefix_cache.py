"""Prefix caching on KV blocks: the same tokens with and without it, on conversations and a
shared system prompt, and Hugging Face's tokens on the turn that reuses the most."""

from __future__ import annotations

import pytest

from engine.engine import LLMEngine
from engine.types import SamplingParams
from tests.support.engine_fixtures import hf_greedy, make_config

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    on = LLMEngine.from_config(make_config(tiny_checkpoint, enable_prefix_caching=True))
    off = LLMEngine.from_config(make_config(tiny_checkpoint, enable_prefix_caching=False))
    yield on, off
    on.shutdown()
    off.shutdown()


def _conversation(engine, turns: int) -> tuple[list[list[int]], list[int]]:
    """Each turn's prompt repeats the conversation so far (as a chat server builds it)."""
    tok = engine.tokenizer
    history = tok.encode("You are a helpful assistant. Answer briefly and kindly. " * 2)
    outputs = []
    for i in range(turns):
        history = history + tok.encode(f"Question {i}: what comes next?", add_bos=False)
        prompt = history
        out = engine.generate_text(history, SamplingParams(max_tokens=12, **GREEDY))
        outputs.append(out.token_ids)
        history = history + out.token_ids
    return outputs, prompt


def test_a_conversation_reuses_its_blocks_and_gives_the_same_tokens(engines, tiny_checkpoint):
    on, off = engines
    with_cache, last_prompt = _conversation(on, 5)
    without, _ = _conversation(off, 5)
    assert with_cache == without
    assert with_cache[-1] == hf_greedy(tiny_checkpoint, last_prompt, 12)
    stats = on.stats()
    # every turn after the first finds the earlier turns' full blocks
    assert stats.prefix_cache_hit_rate >= 0.6 and stats.prefix_cache_hit_tokens > 150
    assert off.stats().prefix_cache_hit_tokens == 0 and off.stats().prefix_cache_queries == 0
    assert stats.kv_blocks_used == 0  # finished requests hold no blocks (cached ones are free)


def test_shared_system_prompt_across_concurrent_requests(engines):
    on, off = engines
    system = on.tokenizer.encode("System: you answer in one short sentence. " * 3)
    prompts = [system + on.tokenizer.encode(f"User {i} asks something.", add_bos=False) for i in range(6)]
    on.generate_text(prompts[0], SamplingParams(max_tokens=4, **GREEDY))  # warms the cache
    before = on.stats().prefix_cache_hit_tokens
    streams = [on.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts]
    cached = [s.result().token_ids for s in streams]
    plain = [off.generate_text(p, SamplingParams(max_tokens=10, **GREEDY)).token_ids for p in prompts]
    assert cached == plain
    block = on.core.config.kv_block_size
    assert on.stats().prefix_cache_hit_tokens - before >= 6 * (len(system) // block) * block
