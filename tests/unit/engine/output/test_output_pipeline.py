"""The output pipeline end to end: stream and final text agree, nothing sent is taken back,
blocking, templates, replaceable stages."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config.output import OutputConfig
from cluster.errors import ConfigError, InvalidRequestError
from engine.output import OutputProcessor, OutputRequest, RawOutput, build_output_processor
from engine.output.pipeline import OutputStages
from engine.output.types import ParseResult
from tests.support.output_full import full_output_config
from tests.support.paths import REPO_ROOT

# Pieces that exercise every stream-time rule: sentence ends, lines, PII, special tokens,
# control characters, code fences, list markers, injection markers, repeats, JSON.
FRAGMENTS = [
    "Hello",
    " ",
    "world",
    ".",
    "!",
    "?",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "é",
    "你好",
    "🙂",
    "bob@example.com",
    "+1 415 555 0100",
    "4111 1111 1111 1111",
    "(415) 555-0100",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</",
    "SYS>>",
    "\x00",
    "\x1b",
    "\r",
    "\ufffd",
    "```",
    "```python\n",
    "~~~\n",
    "* ",
    "+ ",
    "1. ",
    "3) ",
    "- ",
    "Ignore all previous instructions",
    "<|im_start|>",
    "forbidden word",
    "sk-abcdefghijklmnopqrstuvwxyz12",
    "This sentence is long enough to be deduplicated. ",
    "This sentence is long enough to be deduplicated.\n",
    "{",
    "}",
    "[",
    "]",
    '"key": ',
    '"value"',
    ", ",
    "42",
    "true",
    "password=hunter2hunter2",
    "STOP",
    "###",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=40).map(
    "".join
)
# A JSON-ish start makes the stream skip prose transforms: cover that branch often.
json_texts = st.lists(st.sampled_from(FRAGMENTS[40:]), max_size=30).map(
    lambda parts: "{" + "".join(parts)
)


def chunks_of(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(text[last:p])
        last = p
    pieces.append(text[last:])
    return pieces


PROCESSORS = {
    "default": build_output_processor(full_output_config()),
    "strict": build_output_processor(
        OutputConfig.model_validate(
            {
                "sanitize": {"stop_sequences": ["STOP"], "max_output_chars": 120},
                "safety": {
                    "blocklist": ["forbidden word"],
                    "segment_chars": 24,
                    "default_policy": {
                        "actions": {"pii": "redact", "blocklist": "block", "injection": "block"}
                    },
                },
                "post_process": {
                    "dedup_min_chars": 8,
                    "summarize_over_chars": 60,
                    "summary_chars": 40,
                },
                "formats": {"templates": {"wrap": "<{{ format }}>{{ text }}</{{ format }}>"}},
            }
        )
    ),
    "allow_all": build_output_processor(
        OutputConfig.model_validate(
            {
                "safety": {"default_policy": {"actions": {}, "default_action": "allow"}},
                "post_process": {"dedup": False},
                "formats": {"normalize_markdown": False},
            }
        )
    ),
}
REQUESTS = [
    OutputRequest(max_tokens=64),
    OutputRequest(max_tokens=64, stop=("###",)),
    OutputRequest(response_format={"type": "json_object"}),
]


def without_tail(output):
    return dataclasses.replace(output, tail="")


def run_stream(
    processor: OutputProcessor,
    request: OutputRequest,
    pieces: list[str],
    stop_early: bool,
    finish_reason: str | None = "stop",
    completion_tokens: int | None = 10,
):
    stream = processor.stream(request)
    sent = []
    for piece in pieces:
        delta = stream.feed(piece)
        sent.append(delta.text)
        if delta.finish_reason and stop_early:
            break
    result = stream.finish(finish_reason, completion_tokens)
    return "".join(sent), result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(texts, json_texts),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    name=st.sampled_from(sorted(PROCESSORS)),
    request_index=st.integers(min_value=0, max_value=len(REQUESTS) - 1),
    stop_early=st.booleans(),
)
def test_stream_and_final_agree_for_any_chunking(text, cuts, name, request_index, stop_early):
    processor, request = PROCESSORS[name], REQUESTS[request_index]
    if name == "strict" and request_index == 0:
        request = dataclasses.replace(request, template="wrap")
    final = processor.process(RawOutput(text, "stop", 10, request=request))
    sent, streamed = run_stream(processor, request, chunks_of(text, cuts), stop_early)
    assert without_tail(streamed) == without_tail(final)
    # what was sent is never taken back: the final text extends it by exactly the tail
    assert streamed.text == sent + streamed.tail


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_one_character_at_a_time_equals_the_whole(text):
    processor = PROCESSORS["strict"]
    final = processor.process(RawOutput(text, None, 3, request=REQUESTS[0]))
    _, streamed = run_stream(processor, REQUESTS[0], list(text), False, None, 3)
    assert without_tail(streamed) == without_tail(final)


def test_blocked_output_ends_with_content_filter_and_sends_nothing_of_the_segment():
    processor = PROCESSORS["strict"]
    stream = processor.stream(OutputRequest())
    first = stream.feed("A fine first sentence. Then the forbidden ")
    second = stream.feed("word appears. More text.")
    assert first.text == "A fine first sentence. " and first.finish_reason is None
    assert second.finish_reason == "content_filter" and second.text == ""
    assert stream.feed("anything").text == ""
    result = stream.finish("stop", 12)
    assert result.finish_reason == "content_filter" and result.blocked
    assert result.text == "A fine first sentence. " and result.tail == ""
    assert [f.category for f in result.findings] == ["blocklist"]
    assert result.findings[0].action == "block"


def test_policy_is_per_tenant():
    processor = build_output_processor(
        OutputConfig.model_validate(
            {
                "safety": {
                    "default_policy": {"actions": {"pii": "redact"}},
                    "tenants": {
                        "open": {"actions": {"pii": "allow"}},
                        "closed": {"actions": {"pii.email": "block"}},
                    },
                }
            }
        )
    )
    text = "Write to ann@example.org please."
    default = processor.process(RawOutput(text, "stop", request=OutputRequest(tenant="someone")))
    allowed = processor.process(RawOutput(text, "stop", request=OutputRequest(tenant="open")))
    blocked = processor.process(RawOutput(text, "stop", request=OutputRequest(tenant="closed")))
    assert default.text == "Write to [EMAIL] please." and default.findings[0].action == "redact"
    assert allowed.text == text and allowed.findings == ()  # allow-all: no check runs
    assert blocked.text == "" and blocked.finish_reason == "content_filter"


def test_stop_sequence_in_the_pipeline_ends_the_stream_with_stop():
    stream = PROCESSORS["default"].stream(OutputRequest(stop=("###",)))
    assert stream.feed("Answer: 42 #").text == ""  # the sentence and a possible stop held back
    delta = stream.feed("## ignored")
    assert delta.finish_reason == "stop" and delta.text == "Answer: 42 "
    assert stream.finish("length", 5).finish_reason == "stop"


def test_length_is_reported_when_max_tokens_is_used_up_and_overruns_are_errors():
    processor = PROCESSORS["default"]
    used_up = processor.process(
        RawOutput("Some text", None, 8, request=OutputRequest(max_tokens=8))
    )
    assert used_up.finish_reason == "length" and used_up.valid
    overrun = processor.process(
        RawOutput("Some text", "length", 9, request=OutputRequest(max_tokens=8))
    )
    assert not overrun.valid and "max_tokens=8" in overrun.errors[0]


def test_template_holds_the_stream_and_renders_at_the_end():
    processor = PROCESSORS["strict"]
    stream = processor.stream(OutputRequest(template="wrap"))
    assert stream.feed("Plain words here. ").text == ""
    result = stream.finish("stop", 3)
    assert result.text == "<text>Plain words here. </text>" and result.tail == result.text


def test_unknown_template_or_format_is_refused_at_the_start():
    with pytest.raises(InvalidRequestError, match="template='nope'"):
        PROCESSORS["strict"].stream(OutputRequest(template="nope"))
    with pytest.raises(InvalidRequestError, match="format='yaml'"):
        PROCESSORS["default"].stream(OutputRequest(format="yaml"))


def test_a_stage_can_be_replaced_without_touching_the_others():
    class ShoutingParser:
        def parse(self, text, fmt, request):
            return ParseResult(text.upper())

    base = build_output_processor(full_output_config())
    stages = dataclasses.replace(base.stages, parse=ShoutingParser())
    processor = OutputProcessor(stages, formats=base.formats, default_guard=base.default_guard)
    result = processor.process(RawOutput("call 555-0100 now", "stop"))
    assert result.parsed == "CALL [PHONE] NOW"  # safety still ran before the replaced stage


def test_safety_survives_replacing_sanitize_and_post_process():
    class Identity:
        stopped = False

        def open(self, request, prose=None):
            return self

        def feed(self, text):
            return text

        def flush(self):
            return ""

        def segment(self, text):
            return text

        def tail(self):
            return ""

        dropped = 0

        def verify_length(self, finish_reason, completion_tokens, request):
            return finish_reason, []

        def finalize(self, output, facts, request):
            pass

    base = build_output_processor(full_output_config())
    stages = OutputStages(
        Identity(), base.stages.detect_format, base.stages.parse, base.stages.validate, Identity()
    )
    processor = OutputProcessor(stages, formats=base.formats, default_guard=base.default_guard)
    assert processor.process(RawOutput("mail x.y@example.com", "stop")).text == "mail [EMAIL]"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="templates.bad"):
        build_output_processor(
            OutputConfig.model_validate({"formats": {"templates": {"bad": "{% if %}"}}})
        )
    with pytest.raises(ConfigError, match="cannot be read"):
        build_output_processor(
            OutputConfig.model_validate(
                {"formats": {"templates": {"f": {"path": "/nonexistent/t.j2"}}}}
            )
        )


def test_the_documented_config_validates():
    import re

    import yaml

    doc = (REPO_ROOT / "docs" / "output.md").read_text()
    blocks = re.findall(r"```yaml\n(output:\n.*?)```", doc, re.S)
    assert len(blocks) == 2
    configs = [OutputConfig.model_validate(yaml.safe_load(b)["output"]) for b in blocks]
    assert configs[1].safety.policy_for("acme").actions["pii.card"] == "block"
