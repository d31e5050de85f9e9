"""A request resumed from its own output (``EngineCore.add_request(resumed=k)``: the prompt plus
the k tokens a client already has, as after its replica died) continues the stream exactly:
the same token ids, text deltas that add up to the rest of the text, the original counts."""

from __future__ import annotations

import asyncio

import pytest

from cluster.errors import InvalidRequestError
from engine.engine import LLMEngine
from engine.types import RequestOutput, SamplingParams
from tests.support.engine_fixtures import GREEDY, make_config


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = LLMEngine.from_config(make_config(tiny_checkpoint))
    yield eng
    eng.shutdown()


def deltas(engine, prompt_ids, params, resumed=0) -> list[RequestOutput]:
    async def run():
        return [out async for out in engine.generate(prompt_ids, params, resumed=resumed)]

    return asyncio.run(run())


@pytest.mark.parametrize("text", ["Tell me a story about a robot.", "Ünïcödé — 你好, 世界! 🙂"])
def test_a_resumed_greedy_stream_continues_token_for_token_and_character_for_character(engine, text):
    prompt = engine.tokenizer.encode(text)
    params = SamplingParams(max_tokens=60, **GREEDY)
    whole = deltas(engine, prompt, params)
    ids = [t for d in whole for t in d.token_ids]
    assert len(ids) == 60
    for cut in (1, 7, 23, 59):
        sent = [t for d in whole[:cut] for t in d.token_ids]  # one token per delta here
        rest = deltas(engine, prompt + sent, SamplingParams(max_tokens=60 - cut, **GREEDY),
                      resumed=len(sent))
        assert sent + [t for d in rest for t in d.token_ids] == ids, cut
        assert "".join(d.text for d in whole[:cut] + rest) == "".join(d.text for d in whole), cut
        assert (rest[-1].prompt_tokens, rest[-1].completion_tokens) == (len(prompt), 60)
        assert rest[-1].finish_reason == "length"


def test_a_resumed_stream_stops_at_the_same_stop_string(engine):
    prompt = engine.tokenizer.encode("The quick brown fox")
    whole = deltas(engine, prompt, SamplingParams(max_tokens=80, **GREEDY))
    text = "".join(d.text for d in whole)
    stop = text[40:46]  # a stop string the uninterrupted stream meets after the cut below
    assert stop.strip() and stop not in text[:40]
    params = SamplingParams(max_tokens=80, stop=(stop,), **GREEDY)
    stopped = deltas(engine, prompt, params)
    # 5: before the stop string; len - 1: while the stop's first characters are held back
    for cut in (5, len(stopped) - 1):
        sent = [t for d in stopped[:cut] for t in d.token_ids]
        rest = deltas(engine, prompt + sent, SamplingParams(max_tokens=80 - cut, stop=(stop,), **GREEDY),
                      resumed=cut)
        assert "".join(d.text for d in stopped[:cut] + rest) == "".join(d.text for d in stopped), cut
        assert rest[-1].finish_reason == stopped[-1].finish_reason == "stop"


def test_resumed_must_be_a_tail_of_the_prompt(engine):
    with pytest.raises(InvalidRequestError, match="resumed=3"):
        deltas(engine, [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY), resumed=3)


def test_a_resumed_json_stream_keeps_to_its_grammar(engine):
    prompt = engine.tokenizer.encode("Answer in JSON.")
    fmt = {"type": "json_object"}
    whole = deltas(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, response_format=fmt))
    cut = 6
    sent = [t for d in whole[:cut] for t in d.token_ids]
    rest = deltas(engine, prompt + sent, SamplingParams(max_tokens=40 - cut, temperature=0.0, response_format=fmt),
                  resumed=cut)
    assert "".join(d.text for d in whole[:cut] + rest) == "".join(d.text for d in whole)
    assert rest[-1].finish_reason == whole[-1].finish_reason
