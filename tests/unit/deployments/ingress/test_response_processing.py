"""The output pipeline between the engine's deltas and the client (no Ray): whole and
streamed answers agree, a blocked stream stops reading the generation, the usage chunk
comes only when asked for, and bad output fields of a request are a 400 naming them."""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.config import build_app_config
from cluster.errors import InvalidRequestError
from deployments.ingress.openai_api import inputs as oa
from deployments.ingress.openai_api.outputs import ChatChunks, Piece
from deployments.ingress.output_processing import ProcessedStream, ResponseProcessor
from deployments.messages import ChoiceDelta
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from engine.types import RequestOutput
from tests.support.output_full import full_output_config

TEXT = (
    "Llamas are calm. Mail ada@example.com for details.\n"
    "Llamas are calm. Llamas hum when they are together in a herd.\n"
)
REDACTED = (
    "Llamas are calm. Mail [EMAIL] for details.\n"
    "Llamas are calm. Llamas hum when they are together in a herd.\n"
)


@pytest.fixture(scope="module")
def processor() -> ResponseProcessor:
    config = build_app_config(
        {
            "output": full_output_config(
                safety={"tenants": {"strict": {"actions": {"pii": "block"}}}},
                formats={"templates": {"shout": "{{ text | upper }}"}},
            ).model_dump(by_alias=True)
        },
        "test config",
    )
    return ResponseProcessor(config.output)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m-ai-tiny", messages=[{"role": "user", "content": "hi"}], **fields
    )


class Upstream:
    """The LLMServer's deltas for ``text`` split at ``cuts`` (a 7-token prompt); counts what
    was read."""

    def __init__(self, text: str, cuts: list[int], finish: str = "stop"):
        bounds = [0, *sorted(cuts), len(text)]
        self.outs = [
            RequestOutput("r", token_ids=[5], text=text[a:b], prompt_tokens=7)
            for a, b in zip(bounds, bounds[1:])
        ]
        self.outs[-1].finish_reason = finish
        self.outs[-1].completion_tokens = len(self.outs)
        self.chunks = [ChoiceDelta(0, out) for out in self.outs]
        self.read = 0

    def unprocessed(self, like: ChatChunks) -> list:
        """The chunks of these deltas as they are (with the ids of the stream ``like``)."""
        builder = ChatChunks("m-ai-tiny")
        builder.id, builder.created = like.id, like.created
        chunks = [builder.chunk(Piece(0, o.text, o.finish_reason)) for o in self.outs]
        return [c for c in chunks if c is not None] + [builder.usage_chunk(7, len(self.outs))]

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def collect(stream: ProcessedStream) -> list:
    async def run():
        return [c async for c in stream]

    return asyncio.run(run())


def streamed_text(chunks) -> str:
    return "".join(
        (c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
        for c in chunks
        if c.choices
    )


def test_whole_and_streamed_answers_agree_for_any_chunking(processor):
    request = chat()
    whole, _ = processor.chat_response(
        request,
        [ChoiceDelta(0, RequestOutput("r", token_ids=[5] * 30, text=TEXT, finish_reason="stop"))],
        processor.open(request, "acme"),
    )
    assert whole.choices[0].message.content == REDACTED  # redacted, the repeat kept (short)
    assert whole.m_ai.findings[0].category == "pii.email"
    assert whole.m_ai.findings[0].action == "redact"

    rng = random.Random(3)
    for _ in range(40):
        cuts = rng.sample(range(1, len(TEXT)), rng.randrange(0, 30))
        upstream = Upstream(TEXT, cuts)
        stream = ProcessedStream(upstream, processor.open(request, "acme"), False, request)
        chunks = collect(stream)
        assert streamed_text(chunks) == REDACTED == stream.text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in chunks[1:])
        assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
        assert chunks[-1].m_ai == whole.m_ai.model_copy(update={"metrics": chunks[-1].m_ai.metrics})
        assert all(c.m_ai is None for c in chunks[:-1])
        assert all(c.choices for c in chunks)  # the usage chunk was not asked for
        assert stream.upstream_finished and stream.complete
        # text held back until a safe boundary: no more chunks than segments (+ role, end)
        assert len(chunks) <= 7


def test_a_blocked_stream_ends_with_content_filter_and_stops_reading(processor):
    text = "Fine words here.\n" + "Mail ada@example.com now.\n" + "More text follows. " * 20
    upstream = Upstream(text, list(range(3, len(text), 3)))
    stream = ProcessedStream(upstream, processor.open(chat(), "strict"), True, chat())
    chunks = collect(stream)
    assert streamed_text(chunks) == "Fine words here.\n" == stream.text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].m_ai.findings[0].action == "block"
    # it stopped reading soon after the segment with the address: the caller cancels the rest
    assert not stream.upstream_finished and stream.complete
    assert upstream.read < len(upstream.chunks) / 4
    # no usage after a cut (OpenAI: an interrupted stream may miss it)
    assert all(c.choices for c in chunks)

    whole, _ = processor.chat_response(
        chat(), [ChoiceDelta(0, RequestOutput("r", [5], text, "stop"))], processor.open(chat(), "strict")
    )
    assert whole.choices[0].message.content == "Fine words here.\n"
    assert whole.choices[0].finish_reason == "content_filter"


def test_usage_is_sent_last_only_when_asked_and_feeds_the_length_check(processor):
    upstream = Upstream("Short answer cut at the limit", [5, 12], finish="length")
    stream = ProcessedStream(upstream, processor.open(chat(max_tokens=3), "acme"), True, chat(max_tokens=3))
    chunks = collect(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].m_ai.metrics["length_ratio"] == 1.0  # 3 tokens of max_tokens=3


def test_completion_streams_are_processed_too(processor):
    upstream = Upstream(TEXT, [10, 40, 70])
    request = CompletionRequest(model="m-ai-tiny", prompt="x", stream=True)
    chunks = collect(ProcessedStream(upstream, processor.open(request, "acme"), False, request))
    assert streamed_text(chunks) == REDACTED
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].m_ai.valid


def test_a_template_renders_the_whole_answer_at_the_end(processor):
    request = chat(output_template="shout")
    stream = ProcessedStream(Upstream("calm llamas.", [3]), processor.open(request, "acme"), False, request)
    chunks = collect(stream)
    assert [c.choices[0].delta.content for c in chunks] == ["", "CALM LLAMAS."]


def test_with_output_processing_off_chunks_pass_unchanged():
    off = ResponseProcessor(build_app_config({"output": {"enabled": False}}, "t").output)
    assert off.open(chat(), "acme") is None
    upstream = Upstream(TEXT, [4, 50])
    stream = ProcessedStream(upstream, None, True, chat())
    assert collect(stream) == upstream.unprocessed(stream.builder)
    assert stream.text == TEXT and stream.complete and stream.upstream_finished
    with pytest.raises(InvalidRequestError) as info:
        off.open(chat(output_template="shout"), "acme")
    assert info.value.param == "output_template" and "output.enabled" in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"output_template": "nope"}, "output_template"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_output_fields_are_refused_before_generating(processor, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        processor.open(chat(**fields), "acme")
    assert info.value.param == param
    assert param.split(".")[0] in info.value.message


def test_sampling_params_carry_the_response_format():
    from cluster.config import ModelConfig

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    params = oa.sampling_params(chat(response_format=fmt), ModelConfig(), 10, "messages")
    assert params.response_format == fmt and params.constrained
    with pytest.raises(InvalidRequestError) as info:
        oa.sampling_params(chat(response_format={"type": "xml"}), ModelConfig(), 10, "messages")
    assert info.value.param == "response_format.type"


def test_the_fake_engine_answers_a_json_request_with_an_empty_object():
    from engine.fake_engine import FakeEngine
    from engine.types import SamplingParams

    engine = FakeEngine(tokens_per_s=0, tokenizer="bytes")

    async def text(params: SamplingParams) -> str:
        return "".join([o.text async for o in engine.generate("hi", params)])

    assert asyncio.run(text(SamplingParams(response_format={"type": "json_object"}))) == "{}"
    assert asyncio.run(text(SamplingParams(max_tokens=6, temperature=0))) == "Llamas"
    bad = SamplingParams(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(text(bad))
    assert info.value.param == "response_format.json_schema.schema"
