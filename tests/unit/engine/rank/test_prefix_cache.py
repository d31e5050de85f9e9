"""Prefix caching: bookkeeping, and the same tokens with and without it on a conversation."""

from __future__ import annotations

import pytest

from engine.engine import LLMEngine
from engine.rank.prefix_cache import PrefixCache
from engine.types import SamplingParams
from tests.support.engine_fixtures import make_config

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_longest_prefix_wins_and_one_prompt_token_is_left():
    cache = PrefixCache(first_slot=8, num_slots=2, min_tokens=4)
    short = cache.store(list(range(10)))
    other = cache.store([7] * 30)
    assert {short, other} == {8, 9}
    assert cache.lookup(list(range(10)) + [99]) == (short, 10)
    assert cache.lookup(list(range(10))) == (short, 9)  # never the whole prompt
    assert cache.lookup([7] * 12 + [1]) == (other, 12)
    assert cache.lookup([1, 2, 3]) is None
    assert cache.lookup(list(range(3)) + [50] * 10) is None  # below min_tokens
    assert cache.stats.hits == 3 and cache.stats.lookups == 5


def test_extension_replaces_in_place_and_pins_block_eviction():
    cache = PrefixCache(first_slot=4, num_slots=2, min_tokens=2)
    a = cache.store([1, 2, 3])
    assert cache.store([1, 2, 3, 4, 5]) == a  # the next turn of the same conversation
    b = cache.store([9, 9, 9])
    assert b != a and len(cache) == 2
    slot, n = cache.lookup([1, 2, 3, 4, 5, 6])
    assert (slot, n) == (a, 5)
    cache.lookup([9, 9, 9, 1])  # b is now the most recently used, and pinned too
    assert cache.store([5, 5, 5]) is None  # every entry is pinned
    cache.release(a)
    cache.release(b)
    assert cache.store([5, 5, 5]) == a  # least recently used goes first
    assert cache.stats.evicted == 1


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    on = LLMEngine.from_config(make_config(tiny_checkpoint, prefix_cache_slots=4))
    off = LLMEngine.from_config(make_config(tiny_checkpoint, prefix_cache_slots=0))
    yield on, off
    on.shutdown()
    off.shutdown()


def _conversation(engine, turns: int) -> list[list[int]]:
    """Each turn's prompt repeats the conversation so far (as a chat server builds it)."""
    tok = engine.tokenizer
    history = tok.encode("You are a helpful assistant. Answer briefly and kindly. " * 2)
    outputs = []
    for i in range(turns):
        history = history + tok.encode(f"Question {i}: what comes next?", add_bos=False)
        out = engine.generate_text(history, SamplingParams(max_tokens=12, **GREEDY))
        outputs.append(out.token_ids)
        history = history + out.token_ids
    return outputs


def test_a_conversation_gives_the_same_tokens_with_and_without_the_cache(engines):
    on, off = engines
    assert _conversation(on, 5) == _conversation(off, 5)
    stats = on.stats()
    assert stats.prefix_cache_hit_rate >= 0.75  # every turn after the first
    assert stats.prefix_cache_hit_tokens > 100
    assert off.stats().prefix_cache_hit_tokens == 0


def test_shared_system_prompt_across_concurrent_requests(engines):
    on, off = engines
    system = on.tokenizer.encode("System: you answer in one short sentence. " * 3)
    prompts = [system + on.tokenizer.encode(f"User {i} asks something.", add_bos=False) for i in range(6)]
    on.generate_text(prompts[0], SamplingParams(max_tokens=4, **GREEDY))  # warms the cache
    streams = [on.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts]
    cached = [s.result().token_ids for s in streams]
    plain = [off.generate_text(p, SamplingParams(max_tokens=10, **GREEDY)).token_ids for p in prompts]
    assert cached == plain
    assert on.stats().kv_slots_used == 0
