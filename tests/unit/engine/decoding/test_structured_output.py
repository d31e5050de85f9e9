"""Constrained decoding on the random tiny model: schema-valid JSON, batching, length cuts."""

from __future__ import annotations

import json
import time

import pytest

from cluster.config import ModelConfig
from cluster.errors import InvalidRequestError
from engine.decoding.structured import ResponseFormat, StructuredOutput, parse_response_format
from engine.engine import LLMEngine
from engine.output import OutputRequest, RawOutput, build_output_processor
from engine.output.formats import schema_errors
from engine.types import SamplingParams

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "geo": {
                    "type": "object",
                    "properties": {"north": {"type": "boolean"}},
                    "required": ["north"],
                },
            },
            "required": ["city", "geo"],
        },
    },
    "required": ["name", "age", "address"],
}
ARRAYS = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 5},
            "minItems": 1,
            "maxItems": 3,
        },
        "matrix": {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "maxItems": 2,
            },
            "maxItems": 2,
        },
    },
    "required": ["tags", "matrix"],
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "status": {"const": "ok"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["color", "size", "status", "note"],
}
ARRAY_OF_OBJECTS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99},
                    "kind": {"enum": ["book", "pen"]},
                },
                "required": ["id", "kind"],
            },
        }
    },
    "required": ["items"],
}
SCHEMAS = {"nested": NESTED, "arrays": ARRAYS, "enums": ENUMS, "array_of_objects": ARRAY_OF_OBJECTS}
UNBOUNDED = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    config = ModelConfig(
        model_size="tiny",
        checkpoint=str(tiny_checkpoint),
        dtype="float32",
        device="cpu",
        max_num_seqs=16,
        max_batched_tokens=512,
        context_length=512,
        max_tokens=128,
    )
    eng = LLMEngine.from_config(config)
    yield eng
    eng.shutdown()


def assert_schema_valid(out, schema):
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    value = json.loads(out.text)  # strict JSON: raw control characters would fail here
    assert schema_errors(value, schema) == []
    return value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_output_satisfies_the_schema(engine, name):
    schema = SCHEMAS[name]
    streams = [
        engine.submit(
            f"Give me {name} {i}",
            SamplingParams(max_tokens=128, temperature=1.0, seed=i, response_format=fmt(schema)),
        )
        for i in range(6)
    ]
    values = [assert_schema_valid(s.result(), schema) for s in streams]
    assert (
        len({json.dumps(v, sort_keys=True) for v in values}) > 1
    )  # sampled, not one canned answer


def test_mixed_batch_each_sequence_its_own_grammar_and_free_rows_untouched(engine):
    greedy = dict(temperature=0.0, max_tokens=100)
    alone = {
        name: engine.generate_text("Same prompt", SamplingParams(**greedy, response_format=fmt(s)))
        for name, s in SCHEMAS.items()
    }
    free_alone = engine.generate_text(
        "Same prompt", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    streams = {
        name: engine.submit("Same prompt", SamplingParams(**greedy, response_format=fmt(s)))
        for name, s in SCHEMAS.items()
    }
    free = engine.submit(
        "Same prompt", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    for name, stream in streams.items():
        out = stream.result()
        assert_schema_valid(out, SCHEMAS[name])
        assert out.token_ids == alone[name].token_ids  # batching does not mix grammar states
    assert free.result().token_ids == free_alone.token_ids  # no mask on the unconstrained row
    assert engine.core._num_constrained == 0


def test_seeded_constrained_sampling_is_reproducible(engine):
    params = SamplingParams(
        max_tokens=100, temperature=0.9, top_p=0.95, seed=42, response_format=fmt(ENUMS)
    )
    first = engine.generate_text("prompt", params)
    assert engine.generate_text("prompt", params).text == first.text
    assert_schema_valid(first, ENUMS)


def test_an_unbounded_string_cut_by_max_tokens_ends_with_length_and_is_not_valid(engine):
    processor = build_output_processor()
    for seed in range(4):
        params = SamplingParams(
            max_tokens=10, temperature=1.0, seed=seed, response_format=fmt(UNBOUNDED)
        )
        out = engine.generate_text("Write", params)
        assert out.finish_reason == "length" and len(out.token_ids) == 10
        assert out.text.startswith('{"text": "')
        request = OutputRequest.from_params(params, tenant="t")
        assert request.max_tokens == 10 and request.response_format == fmt(UNBOUNDED)
        result = processor.process(
            RawOutput(out.text, out.finish_reason, out.completion_tokens, request=request)
        )
        assert not result.valid and any("finish_reason=length" in e for e in result.errors)
        assert result.finish_reason == "length"


def test_json_object_yields_an_object_or_an_honest_length(engine):
    processor = build_output_processor()
    for seed in range(6):
        out = engine.generate_text(
            "Any JSON",
            SamplingParams(
                max_tokens=48, temperature=1.0, seed=seed, response_format={"type": "json_object"}
            ),
        )
        assert out.text.startswith("{")
        result = processor.process(
            RawOutput(
                out.text,
                out.finish_reason,
                out.completion_tokens,
                request=OutputRequest(response_format={"type": "json_object"}),
            )
        )
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict) and result.valid
        else:
            assert out.finish_reason == "length" and not result.valid


def test_cancelling_a_constrained_request_releases_its_grammar(engine):
    stream = engine.submit(
        "x", SamplingParams(max_tokens=200, temperature=1.0, response_format=fmt(UNBOUNDED))
    )
    it = iter(stream)
    next(it)
    stream.cancel()
    assert list(it)[-1].finish_reason == "abort"
    deadline = time.monotonic() + 2
    while engine.core._num_constrained and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.core._num_constrained == 0


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (
            fmt({"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_schemas_are_refused_at_submit(engine, response_format, param):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit("x", SamplingParams(response_format=response_format))
    assert err.value.param == param
    assert engine.core._num_constrained == 0


def test_sampling_params_checks_the_type():
    with pytest.raises(ValueError, match="json_object or json_schema"):
        SamplingParams(response_format={"type": "yaml"})
    assert not SamplingParams(response_format={"type": "text"}).constrained
    assert SamplingParams(response_format={"type": "json_object"}).constrained


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, None),
        ({"type": "text"}, "text"),
        ('{"type": "json_object"}', "json_object"),
        (fmt(ENUMS), "json_schema"),
    ],
)
def test_parse_response_format(value, kind):
    parsed = parse_response_format(value)
    assert (parsed.kind if parsed else None) == kind
    if kind == "json_schema":
        assert parsed == ResponseFormat("json_schema", ENUMS, "t", True)


def test_tokenizer_info_knows_the_byte_fallback_vocabulary(engine):
    import xgrammar as xgr

    structured = StructuredOutput(engine.tokenizer)
    assert structured.info.vocab_type == xgr.VocabType.BYTE_FALLBACK
    byte_a = engine.tokenizer.hf_tokenizer.convert_tokens_to_ids("<0x41>")
    assert structured.info.decoded_vocab[byte_a] == b"A"
    assert engine.core.structured_output() is engine.core.structured_output()  # built once
    # control bytes never enter JSON: <0x00>..<0x1F> are masked for every grammar row
    bits = structured._no_control_bytes[0]
    for byte in (0x00, 0x0A, 0x1F, 0x20, 0x41):
        token = engine.tokenizer.hf_tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
        assert bool((int(bits[token // 32]) >> (token % 32)) & 1) is (byte >= 0x20)
