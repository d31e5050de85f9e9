"""The engine core on the tiny checkpoint: golden outputs, batching, sampling, stops, cancel."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cluster.errors import InvalidRequestError
from engine.engine import LLMEngine
from engine.types import SamplingParams
from tests.support.engine_fixtures import GREEDY, hf_greedy, make_config


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = LLMEngine.from_config(make_config(tiny_checkpoint))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(engine):
    texts = [
        "Hello there, how are you today?",
        "The quick brown fox jumps over the lazy dog. " * 6,
        "1 2 3 4 5",
        "Tell me a story about a robot who learns to paint pictures of the sea at night.",
        "Ünïcödé — 你好, 世界! 🙂",
        "A",
    ]
    return [engine.tokenizer.encode(t) for t in texts]


def test_greedy_matches_hugging_face_generate(engine, prompts, tiny_checkpoint):
    for p in prompts[:2]:
        got = engine.generate_text(p, SamplingParams(max_tokens=24, **GREEDY))
        assert got.token_ids == hf_greedy(tiny_checkpoint, p, 24)
        assert got.finish_reason == "length"


def test_batched_requests_joining_at_different_steps_equal_alone(engine, prompts):
    lengths = [30, 12, 25, 40, 7, 33]
    alone = [engine.generate_text(p, SamplingParams(max_tokens=n, **GREEDY)).token_ids
             for p, n in zip(prompts, lengths)]
    streams = []
    for p, n in zip(prompts, lengths):  # staggered: each joins a batch already decoding
        streams.append(engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)))
        time.sleep(0.01)
    together = [s.result().token_ids for s in streams]
    assert together == alone
    assert engine.stats().running == 0 and engine.stats().kv_slots_used == 0


def test_chunked_prefill_gives_the_same_tokens(tiny_checkpoint, prompts, engine):
    long_prompt = prompts[1] * 3  # longer than the small budget below: prefilled in chunks
    want = engine.generate_text(long_prompt, SamplingParams(max_tokens=16, **GREEDY)).token_ids
    with LLMEngine.from_config(make_config(tiny_checkpoint, max_batched_tokens=32)) as small:
        got = small.generate_text(long_prompt, SamplingParams(max_tokens=16, **GREEDY)).token_ids
    assert got == want


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine, prompts):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = engine.generate_text(prompts[0], params).token_ids
    others = [engine.submit(p, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
              for p in prompts[1:4]]
    again = engine.submit(prompts[0], params)
    assert again.result().token_ids == first
    for s in others:
        s.result()
    different = engine.generate_text(prompts[0], SamplingParams(**{**params.__dict__, "seed": 99})).token_ids
    assert different != first


def test_max_tokens_ends_with_length(engine, prompts):
    out = engine.generate_text(prompts[2], SamplingParams(max_tokens=5, **GREEDY))
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5 and out.completion_tokens == 5
    assert out.prompt_tokens == len(prompts[2])


def test_stop_string_ends_with_stop_and_is_not_returned(engine, prompts):
    full = engine.generate_text(prompts[3], SamplingParams(max_tokens=40, **GREEDY)).text
    assert len(full) > 12
    stop = full[8:11]  # a piece from the middle, likely to span tokens
    out = engine.generate_text(prompts[3], SamplingParams(max_tokens=40, stop=(stop,), **GREEDY))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_stop_token_id_ends_with_stop(engine, prompts):
    full = engine.generate_text(prompts[0], SamplingParams(max_tokens=20, **GREEDY)).token_ids
    out = engine.generate_text(prompts[0], SamplingParams(max_tokens=20, stop_token_ids=(full[5],), **GREEDY))
    assert out.finish_reason == "stop"
    assert out.token_ids == full[: full.index(full[5])]


def test_streamed_text_equals_the_decoded_tokens(engine, prompts):
    stream = engine.submit(prompts[4], SamplingParams(max_tokens=48, **GREEDY))
    deltas = list(stream)
    text = "".join(d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    assert text == engine.tokenizer.decode(ids)
    assert "\ufffd" not in text or "\ufffd" in engine.tokenizer.decode(ids)
    assert sum(1 for d in deltas if d.finished) == 1 and deltas[-1].finished


def test_result_after_reading_some_deltas_returns_the_rest_in_order(engine, prompts):
    want = engine.generate_text(prompts[3], SamplingParams(max_tokens=30, **GREEDY))
    stream = engine.submit(prompts[3], SamplingParams(max_tokens=30, **GREEDY))
    first = next(iter(stream))  # meanwhile the engine goes on: later deltas queue up
    rest = stream.result()  # from here on they are collected without waking this thread
    assert first.token_ids + rest.token_ids == want.token_ids
    assert first.text + rest.text == want.text
    assert rest.finish_reason == "length" and rest.completion_tokens == 30


def test_result_of_a_cancelled_request_has_every_token_made_before(engine, prompts):
    want = engine.generate_text(prompts[0], SamplingParams(max_tokens=400, **GREEDY)).token_ids
    stream = engine.submit(prompts[0], SamplingParams(max_tokens=400, **GREEDY))
    box: list = []
    waiter = threading.Thread(target=lambda: box.append(stream.result()))
    waiter.start()  # result(): the deltas are collected, the waiter is woken by the last one
    deadline = time.monotonic() + 5
    while not stream._collected and time.monotonic() < deadline:
        time.sleep(0.005)
    stream.cancel()
    waiter.join(10)
    out = box[0]
    assert out.finish_reason == "abort"
    assert 0 < len(out.token_ids) == out.completion_tokens < 400
    assert out.token_ids == want[: len(out.token_ids)]
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_cancel_frees_the_slot_at_once(engine, prompts):
    stream = engine.submit(prompts[0], SamplingParams(max_tokens=400, **GREEDY))
    it = iter(stream)
    next(it)
    assert engine.stats().kv_slots_used == 1
    stream.cancel()
    last = list(it)[-1]
    assert last.finish_reason == "abort"
    deadline = time.monotonic() + 2
    while engine.stats().kv_slots_used and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().kv_slots_used == 0


def test_async_generate_closed_early_cancels(engine, prompts):
    async def consume():
        agen = engine.generate(prompts[0], SamplingParams(max_tokens=400, **GREEDY))
        async for _ in agen:
            break
        await agen.aclose()

    asyncio.run(consume())
    deadline = time.monotonic() + 2
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().running == 0


def test_prompt_plus_max_tokens_over_context_is_refused(engine, prompts):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(prompts[0], SamplingParams(max_tokens=600))
    assert "max_tokens" in err.value.message and "512" in err.value.message


def test_many_concurrent_requests_beyond_max_num_seqs_all_finish(engine, prompts):
    results = []
    lock = threading.Lock()

    def run(i):
        out = engine.generate_text(prompts[i % len(prompts)], SamplingParams(max_tokens=8 + i % 5, **GREEDY))
        with lock:
            results.append((i, out))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    for i, out in results:
        assert len(out.token_ids) == 8 + i % 5


@pytest.mark.timeout(300)
def test_tensor_parallel_2_gives_the_same_tokens_as_1(tiny_checkpoint, engine, prompts):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (24, 16, 20)]
    want = [engine.generate_text(p, sp).token_ids for p, sp in zip(prompts[:3], params)]
    with LLMEngine.from_config(make_config(tiny_checkpoint, tp_size=2)) as tp2:
        alone = tp2.generate_text(prompts[0], params[0]).token_ids
        streams = [tp2.submit(p, sp) for p, sp in zip(prompts[:3], params)]
        batched = [s.result().token_ids for s in streams]
        tp2.check_health()
    assert alone == want[0]
    assert batched == want
