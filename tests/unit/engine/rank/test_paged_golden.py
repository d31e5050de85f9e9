"""The paged KV cache against Hugging Face ``generate`` (fp32, greedy), token for token: a
batch whose requests join at different steps in a pool too small for all of them at once, so
sequences are preempted and recomputed mid-decode, with block sizes that split prompts
unevenly, and with tensor parallelism (the block tables travel to the other rank)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.engine import LLMEngine
from engine.types import SamplingParams
from tests.support.engine_fixtures import GREEDY, make_config

TEXTS = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tell me a story about a robot who learns to paint.",
    "1 2 3 4 5 6 7 8 9 10",
]


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def hf_tokens(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block_size, tp_size", [(16, 1), (5, 1), (16, 2)])
def test_preempted_and_resumed_sequences_match_hugging_face(tiny_checkpoint, hf_model, block_size, tp_size):
    # 4 sequences of up to ~70 tokens in 120 KV positions: they cannot all run at once
    blocks = 120 // block_size
    config = make_config(tiny_checkpoint, kv_block_size=block_size, kv_cache_blocks=blocks,
                         max_num_seqs=4, kv_watermark=0.0, tp_size=tp_size)
    n_out = 40
    with LLMEngine.from_config(config) as engine:
        prompts = [engine.tokenizer.encode(t) for t in TEXTS]
        streams = []
        for p in prompts:  # joining at different steps: the next one right after a step (a
            # wall-clock pause let a loaded machine finish the first ones before the last joined)
            steps = engine.stats().steps
            streams.append(engine.submit(p, SamplingParams(max_tokens=n_out, **GREEDY)))
            deadline = time.monotonic() + 10
            while engine.stats().steps <= steps and time.monotonic() < deadline:
                time.sleep(0.001)
        deltas = [[t for out in s for t in out.token_ids] for s in streams]
        stats = engine.stats()
    assert stats.num_preemptions > 0
    for p, got in zip(prompts, deltas):
        assert got == hf_tokens(hf_model, p, n_out)  # streamed: nothing repeated or lost


@pytest.mark.timeout(300)
def test_two_threads_share_decode_attention_match_hugging_face_and_keep_their_thread_count(
        tiny_checkpoint, hf_model, monkeypatch):
    """On SDPA (``M_AI_CPU_ATTENTION=sdpa``) at two torch threads each decode attention call
    runs on one thread, and the sequences are shared between the engine's thread and a helper
    (``engine.rank.decode_threads``): the answers stay Hugging Face's, and the matmuls get both
    threads back after every step."""
    monkeypatch.setenv("M_AI_CPU_ATTENTION", "sdpa")
    config = make_config(tiny_checkpoint, max_num_seqs=8, cpu_threads_per_rank=2)
    seen: list[int] = []
    with LLMEngine.from_config(config) as engine:
        runner = engine.core.worker.runner
        forward = runner.forward

        def counted(*args, **kwargs):
            out = forward(*args, **kwargs)
            seen.append(torch.get_num_threads())
            return out

        attend = runner._attend
        decode_threads: list[int] = []
        decode_callers: set[int] = set()

        def attended(q, keys, values, mask, causal=False):
            if q.shape[2] == 1 and mask is None and not causal:  # a decode row
                decode_threads.append(torch.get_num_threads())
                decode_callers.add(threading.get_ident())
            return attend(q, keys, values, mask, causal)

        runner.forward, runner._attend = counted, attended
        texts = TEXTS + [t.upper() for t in TEXTS]  # 8 sequences: two shares of four
        prompts = [engine.tokenizer.encode(t) for t in texts]
        streams = [engine.submit(p, SamplingParams(max_tokens=24, **GREEDY)) for p in prompts]
        deltas = [[t for out in s for t in out.token_ids] for s in streams]
    assert seen and set(seen) == {2}
    assert decode_threads and set(decode_threads) == {1}
    assert len(decode_callers) == 2  # the engine's thread and one helper
    for p, got in zip(prompts, deltas):
        assert got == hf_tokens(hf_model, p, 24)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_cpu_decode_attention_op_matches_hugging_face(tiny_checkpoint, hf_model, threads):
    """Decode rows go to the C++ op (engine/rank/cpu_attention.py), all of a step's sequences in
    one call per layer, shared over the rank's threads: Hugging Face's tokens, and no decode
    row reaches SDPA."""
    config = make_config(tiny_checkpoint, max_num_seqs=8, kv_block_size=5, cpu_threads_per_rank=threads)
    with LLMEngine.from_config(config) as engine:
        runner = engine.core.worker.runner
        assert runner.decode_kernel is not None
        kernel, attend = runner.decode_kernel, runner._attend
        calls: list[int] = []
        sdpa_decode_rows: list[int] = []

        def counted(q, *args):
            calls.append(q.shape[0])
            return kernel(q, *args)

        def attended(q, keys, values, mask, causal=False):
            if q.shape[2] == 1 and mask is None and not causal:
                sdpa_decode_rows.append(1)
            return attend(q, keys, values, mask, causal)

        runner.decode_kernel, runner._attend = counted, attended
        texts = TEXTS + [t.upper() for t in TEXTS]
        prompts = [engine.tokenizer.encode(t) for t in texts]
        streams = [engine.submit(p, SamplingParams(max_tokens=24, **GREEDY)) for p in prompts]
        deltas = [[t for out in s for t in out.token_ids] for s in streams]
    assert calls and max(calls) > 1 and not sdpa_decode_rows
    for p, got in zip(prompts, deltas):
        assert got == hf_tokens(hf_model, p, 24)
