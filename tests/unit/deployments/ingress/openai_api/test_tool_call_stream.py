"""Constrained tool-call JSON becomes OpenAI's streamed deltas as it grows: a first delta with
index, id, type, name and empty arguments, then fragments that join to the arguments."""

from __future__ import annotations

import json

import pytest

from deployments.ingress.openai_api.tool_call_stream import ToolCallStream


def run(text: str, step: int) -> tuple[list, list[list]]:
    stream = ToolCallStream()
    per_feed = [stream.feed(text[i : i + step]) for i in range(0, len(text), step)]
    return [d for feed in per_feed for d in feed], per_feed


def joined(deltas: list) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "", "first": d})
        call["id"] = call["id"] or d.id
        call["name"] += d.function.name or ""
        call["arguments"] += d.function.arguments or ""
    return calls


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_one_call_streams_its_arguments_in_fragments(step):
    text = '{"name": "get_weather", "arguments": {"city": "Os\\"lo}", "days": [1, {"x": 2}]}}'
    deltas, per_feed = run(text, step)
    calls = joined(deltas)
    assert list(calls) == [0]
    first = calls[0]["first"]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id.startswith("call_") and all(d.id is None for d in deltas[1:])
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": 'Os"lo}', "days": [1, {"x": 2}]}
    if step == 1:  # fragments go out as the text grows, not at the end
        assert sum(1 for feed in per_feed if feed) > 10


def test_a_list_of_calls_and_arguments_before_the_name():
    text = '[{"arguments": {"zone": "UTC"}, "name": "get_time"}, {"name": "get_weather", "arguments": {}}]'
    stream = ToolCallStream()
    early = stream.feed(text[:30])  # the arguments have begun, the name is unknown: nothing yet
    assert early == []
    calls = joined(early + stream.feed(text[30:]))
    assert [calls[i]["name"] for i in (0, 1)] == ["get_time", "get_weather"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"zone": "UTC"}, {}]
    assert calls[0]["id"] != calls[1]["id"]


def test_nothing_starts_before_a_name_is_whole():
    stream = ToolCallStream()
    assert stream.feed('{"name": "get_wea') == [] and not stream.started
    assert stream.feed('ther"')[0].function.name == "get_weather" and stream.started
