"""Formats (detect, parse, validate against response_format), markdown normalization,
templates, deduplication, summaries and quality metrics."""

from __future__ import annotations

import pytest

from cluster.config.output import OutputConfig
from engine.output import OutputRequest, RawOutput, build_output_processor
from engine.output.formats import FormatDetector, FormatRegistry, code_blocks, schema_errors
from engine.output.markdown import MarkdownLines
from engine.output.postprocess import ExtractiveSummarizer, quality_metrics
from tests.support.output_full import full_output_config

PROCESSOR = build_output_processor(full_output_config())
DETECT = FormatDetector(FormatRegistry())
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["name"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}


def process(text: str, finish_reason: str | None = "stop", **request) -> object:
    return PROCESSOR.process(RawOutput(text, finish_reason, request=OutputRequest(**request)))


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ('{"a": 1}', "json"),
        ('  [1, 2, {"b": null}]\n', "json"),
        ('```json\n{"a": 1}\n```', "json"),
        ('{"a": 1', "json"),  # broken JSON is still JSON (reported invalid)
        ("# Title\n\nSome text", "markdown"),
        ("Steps:\n- one\n- two\n\nSee **this** [link](http://x.y)", "markdown"),
        ("```python\nprint(1)\n```", "markdown"),
        ("Just a plain sentence. And another one.", "text"),
        ("", "text"),
    ],
)
def test_format_detection(text, fmt):
    assert DETECT.detect(text, OutputRequest()) == fmt


def test_response_format_and_request_format_decide_the_format():
    assert DETECT.detect("hello", OutputRequest(response_format={"type": "json_object"})) == "json"
    assert DETECT.detect('{"a": 1}', OutputRequest(response_format={"type": "text"})) == "json"
    assert DETECT.detect('{"a": 1}', OutputRequest(format="text")) == "text"


@pytest.mark.parametrize(
    ("text", "finish_reason", "valid", "error_part"),
    [
        ('{"name": "ann", "tags": ["a"]}', "stop", True, None),
        ('{"name": "annabel"}', "stop", False, "name: 'annabel' is too long"),
        ('{"name": "x", "tags": ["c"]}', "stop", False, "tags/0"),
        ('{"tags": []}', "stop", False, "'name' is a required property"),
        ('{"name": "x", "extra": 1}', "stop", False, "Additional properties"),
        ('{"name": "ann"', "length", False, "not valid JSON"),
        ('{"name": "ann"}', "length", False, "cut at max_tokens"),  # never passed off as valid
        ("not json at all", "stop", False, "not valid JSON"),
    ],
)
def test_json_is_validated_against_the_schema(text, finish_reason, valid, error_part):
    out = process(text, finish_reason, response_format=JSON_SCHEMA_FORMAT)
    assert out.format == "json" and out.valid is valid
    if error_part:
        assert any(error_part in e for e in out.errors), out.errors
    else:
        assert out.parsed == {"name": "ann", "tags": ["a"]}


def test_json_object_must_be_an_object():
    assert process('{"k": [1]}', response_format={"type": "json_object"}).valid
    out = process("[1, 2]", response_format={"type": "json_object"})
    assert not out.valid and "is not of type 'object'" in out.errors[0]


def test_schema_errors_are_bounded_and_located():
    errors = schema_errors(
        {"a": [1, "x", "y", "z", "w", "v"]},
        {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}},
        limit=3,
    )
    assert len(errors) == 3 and all(e.startswith("a/") for e in errors)


def test_code_blocks_are_extracted_and_an_open_fence_is_closed():
    text = "Intro\n```python\nx = 1\n```\nthen\n~~~\nopen block"
    blocks = code_blocks(text)
    assert [(b.language, b.code, b.closed) for b in blocks] == [
        ("python", "x = 1", True),
        ("", "open block", False),
    ]
    out = process(text)
    assert out.text.endswith("open block\n~~~") and out.format == "markdown"
    assert [b.closed for b in out.code_blocks] == [True, True]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["* a\n", "+ b\n", "- c\n"], ["- a\n", "- b\n", "- c\n"]),
        (["1. a\n", "1. b\n", "7. c\n"], ["1. a\n", "2. b\n", "3. c\n"]),
        (["3) a\n", "\n", "3) b\n"], ["3) a\n", "\n", "4) b\n"]),  # a blank line keeps the list
        (["1. a\n", "text\n", "1. b\n"], ["1. a\n", "text\n", "1. b\n"]),  # text ends it
        (
            ["1. a\n", "   * x\n", "   * y\n", "1. b\n"],
            ["1. a\n", "   - x\n", "   - y\n", "2. b\n"],
        ),
        (["* * *\n"], ["* * *\n"]),  # a thematic break, not a list
        (["```\n", "* code\n", "```\n", "* list\n"], ["```\n", "* code\n", "```\n", "- list\n"]),
    ],
)
def test_markdown_lists(lines, expected):
    md = MarkdownLines()
    assert [md.line_start(line) for line in lines] == expected


def test_blank_lines_collapse_outside_code_only():
    out = process("a\n\n\n\nb\n```\n\n\n\n```\n")
    assert out.text == "a\n\nb\n```\n\n\n\n```\n"


@pytest.mark.parametrize(
    ("text", "expected", "dropped"),
    [
        (
            "This sentence repeats itself. This sentence repeats itself. End.",
            "This sentence repeats itself. End.",
            1,
        ),
        (
            "Para one is long enough here.\nSecond line is also long enough.\n\n"
            "Para one is long enough here.\nSecond line is also long enough.\n\nNew.",
            "Para one is long enough here.\nSecond line is also long enough.\n\nNew.",
            2,
        ),
        (
            "First line, then a repeat here. Then this line ends right here.\nThen this line ends right here.\n",
            "First line, then a repeat here. Then this line ends right here.\n",
            1,
        ),
        (
            "A line that says something new. And a sentence to repeat here.\nAnd a sentence to repeat here. Tail\n",
            "A line that says something new. And a sentence to repeat here.\nTail\n",
            1,
        ),
        ("Yes. Yes. Yes.", "Yes. Yes. Yes.", 0),  # short sentences may repeat
        ("```\nthe same code line again\nthe same code line again\n```", None, 0),  # not in code
        ('{"a": "Same sentence long enough. Same sentence long enough."}', None, 0),  # not in JSON
    ],
)
def test_deduplication(text, expected, dropped):
    out = process(text)
    assert out.text == (text if expected is None else expected)
    assert out.metrics.deduplicated == dropped


def test_templates_render_the_processed_output():
    processor = build_output_processor(
        OutputConfig.model_validate(
            {
                "formats": {
                    "templates": {
                        "json_table": "{% for k, v in parsed.items() %}{{ k }}={{ v }};{% endfor %}",
                        "fenced": "{% for b in code_blocks %}[{{ b.language }}]{{ b.code }}{% endfor %}",
                    }
                }
            }
        )
    )
    out = processor.process(
        RawOutput('{"a": 1, "b": "x"}', "stop", request=OutputRequest(template="json_table"))
    )
    assert out.text == "a=1;b=x;"
    out = processor.process(
        RawOutput("```sh\nls\n```", "stop", request=OutputRequest(template="fenced"))
    )
    assert out.text == "[sh]ls"
    broken = processor.process(
        RawOutput("plain", "stop", request=OutputRequest(template="json_table"))
    )
    assert broken.text == "plain" and not broken.valid and "json_table" in broken.errors[0]


def test_templates_are_sandboxed():
    processor = build_output_processor(
        OutputConfig.model_validate(
            {"formats": {"templates": {"evil": "{{ text.__class__.__mro__ }}"}}}
        )
    )
    out = processor.process(RawOutput("x", "stop", request=OutputRequest(template="evil")))
    assert not out.valid and "unsafe" in out.errors[0]


def test_summary_only_for_long_output_and_within_budget():
    processor = build_output_processor(
        OutputConfig.model_validate(
            {"post_process": {"summarize_over_chars": 150, "summary_chars": 80}}
        )
    )
    text = (
        "Llamas live in herds in the mountains. Llamas hum when calm. The weather was cold. "
        "Herds of llamas carry loads in the mountains. A car drove by. Llamas are social animals."
    )
    out = processor.process(RawOutput(text, "stop"))
    assert out.summary is not None and len(out.summary) <= 80 and "lama" in out.summary
    assert processor.process(RawOutput("Short text.", "stop")).summary is None


def test_extractive_summary_keeps_order_and_prefers_frequent_words():
    text = "Birds fly. Dogs bark at cats and cats run. Cats sleep. Cats and dogs are pets."
    # scores (mean frequency of words over 3 letters): "Cats sleep." 2.5, "Dogs bark..." 1.6,
    # "Cats and dogs..." 1.4, "Birds fly." 0.5; the best that fit in 45 chars, in text order
    summary = ExtractiveSummarizer().summarize(text, 45)
    assert summary == "Dogs bark at cats and cats run. Cats sleep."


@pytest.mark.parametrize(
    ("text", "repetition", "distinct_1", "distinct_2"),
    [
        ("a b c d", 0.0, 1.0, 1.0),
        ("a b a b a b", 0.5, 2 / 6, 2 / 5),
        ("", 0.0, 0.0, 0.0),
    ],
)
def test_quality_metrics(text, repetition, distinct_1, distinct_2):
    m = quality_metrics(
        text,
        format_valid=True,
        completion_tokens=5,
        max_tokens=20,
        raw_chars=2 * len(text) or 1,
        redactions=1,
        deduplicated=0,
    )
    assert m.repetition_rate == pytest.approx(repetition)
    assert m.distinct_1 == pytest.approx(distinct_1) and m.distinct_2 == pytest.approx(distinct_2)
    assert m.length_ratio == 0.25 and m.as_dict()["redactions"] == 1


def test_metrics_come_with_every_processed_output():
    out = process("Hello a@b.io there", max_tokens=10)
    assert out.metrics.redactions == 1 and out.metrics.format_valid is True
    assert out.metrics.kept_ratio == pytest.approx(len(out.text) / len("Hello a@b.io there"))


def test_every_quality_metric_is_described_for_the_metrics_layer():
    import dataclasses

    from engine.output.types import QUALITY_METRIC_HELP, QualityMetrics

    assert [f.name for f in dataclasses.fields(QualityMetrics)] == list(QUALITY_METRIC_HELP)
