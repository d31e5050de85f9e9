"""OpenAI's sampling fields on the sampler and the real tiny engine: penalties and logit bias
against hand-computed distributions, logprobs against the model's own log-softmax, n
siblings sharing the prompt's KV, min_tokens, include_stop_str_in_output, guided choice."""

from __future__ import annotations

import math

import pytest
import torch

from engine.decoding.logits_processing import apply_logit_processors, token_logprobs
from engine.decoding.sampling import Sampler
from engine.engine import LLMEngine
from engine.types import SamplingParams
from tests.support.engine_fixtures import make_config

GREEDY = dict(temperature=0.0)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_presence_and_frequency_penalties_match_the_formula_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, -1.0]])
    output = [[2, 2, 2, 1]]  # token 2 seen three times, token 1 once
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    got = apply_logit_processors(logits, params, output, eos_token_id=None)
    # logit[j] - 0.25 * count[j] - 0.5 * (count[j] > 0)
    expected = [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 0.5, -1.0]
    assert got[0].tolist() == pytest.approx(expected)
    assert logits[0].tolist() == [1.0, 2.0, 3.0, 0.5, -1.0]  # the input is left as it was
    probs = torch.softmax(got[0], dim=-1).tolist()
    assert probs == pytest.approx(softmax(expected))


def test_negative_penalties_favour_repeats():
    logits = torch.zeros(1, 4)
    got = apply_logit_processors(logits, [SamplingParams(presence_penalty=-2.0)], [[3]], None)
    assert got[0].tolist() == [0.0, 0.0, 0.0, 2.0]


def test_logit_bias_shifts_the_distribution_and_100_forces_a_token():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    params = [SamplingParams(logit_bias={0: 2.5, 3: -1.0})]
    got = apply_logit_processors(logits, params, None, None)
    assert got[0].tolist() == pytest.approx([2.5, 1.0, 2.0, 2.0])
    assert torch.softmax(got[0], -1).tolist() == pytest.approx(softmax([2.5, 1.0, 2.0, 2.0]))
    sampler = Sampler(seed=0)
    forced = SamplingParams(temperature=1.0, logit_bias={1: 100.0})
    banned = SamplingParams(temperature=0.0, logit_bias={3: -100.0})
    for _ in range(20):
        tokens = sampler.sample(logits.repeat(2, 1), [forced, banned], output_tokens=[[], []]).tolist()
        assert tokens == [1, 2]


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 0.0, 4.0]])  # eos (1) is the argmax, then token 3
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))]
    sampler = Sampler(eos_token_id=1)
    assert sampler.sample(logits, params, output_tokens=[[7]]).tolist() == [0]
    assert sampler.sample(logits, params, output_tokens=[[7, 7]]).tolist() == [1]


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=1)
    params = [SamplingParams(temperature=1.0, min_p=0.5)]  # keeps p >= 0.25: tokens 0, 1
    seen = {sampler.sample(logits, params).item() for _ in range(200)}
    assert seen == {0, 1}


def test_token_logprobs_are_the_log_softmax_and_its_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = token_logprobs(logits, [2, 0], [2, 0])
    expected = [math.log(p) for p in softmax([1.0, 3.0, 2.0, 0.0])]
    assert got[0].token_id == 2 and got[0].logprob == pytest.approx(expected[2])
    assert [t for t, _ in got[0].top] == [1, 2]
    assert [v for _, v in got[0].top] == pytest.approx([expected[1], expected[2]])
    assert got[1].logprob == pytest.approx(math.log(0.25)) and got[1].top == ()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = LLMEngine.from_config(make_config(tiny_checkpoint))
    yield eng
    eng.shutdown()


def test_engine_logprobs_match_the_models_log_softmax(engine, tiny_checkpoint):
    from transformers import LlamaForCausalLM

    prompt = engine.tokenizer.encode("The llama is a domesticated South American camelid.")
    out = engine.generate_text(prompt, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    assert len(out.logprobs) == len(out.token_ids) == 6
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[len(prompt) - 1 + step]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top_values, top_ids = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top_ids.tolist()  # greedy: the sampled one is first
        assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_siblings_share_the_prompt_kv_and_decode_like_separate_requests(engine):
    prompt = engine.tokenizer.encode("A long shared prompt about llamas and alpacas. " * 4)
    params = SamplingParams(max_tokens=8, **GREEDY)
    alone = engine.generate_text(prompt, params).token_ids
    hits_before = engine.stats().prefix_cache_hit_tokens
    leader = engine.submit(prompt, params, request_id="leader-1")
    # parked until the leader's prompt is computed, then admitted with its KV copied
    siblings = [engine.submit(prompt, params, share_prompt_of="leader-1") for _ in range(3)]
    assert leader.result().token_ids == alone
    for sink in siblings:
        assert sink.result().token_ids == alone  # the copied KV gives the same greedy tokens
    # each sibling loaded len(prompt) - 1 tokens from the cache instead of computing them
    assert engine.stats().prefix_cache_hit_tokens - hits_before >= 3 * (len(prompt) - 1)


def test_include_stop_str_in_output_and_min_tokens(engine):
    prompt = engine.tokenizer.encode("Once upon a time")
    free = engine.generate_text(prompt, SamplingParams(max_tokens=24, **GREEDY)).text
    stop = free[3:5]
    cut = engine.generate_text(prompt, SamplingParams(max_tokens=24, stop=(stop,), **GREEDY)).text
    kept = engine.generate_text(
        prompt, SamplingParams(max_tokens=24, stop=(stop,), include_stop_str_in_output=True, **GREEDY)
    ).text
    assert kept == cut + stop
    eos_first = SamplingParams(max_tokens=5, min_tokens=5, logit_bias={engine.tokenizer.eos_token_id: 100.0}, **GREEDY)
    out = engine.generate_text(prompt, eos_first)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_guided_choice_regex_constrains_the_text(engine):
    prompt = engine.tokenizer.encode("Is the sky blue?")
    for seed in range(3):
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, guided={"regex": "(yes|no|maybe)"})
        out = engine.generate_text(prompt, params)
        assert out.text in ("yes", "no", "maybe") and out.finish_reason == "stop"
