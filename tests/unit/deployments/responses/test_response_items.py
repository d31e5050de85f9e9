"""Tool calls and results keep their typed items through the session store's shapes, and a
streamed response's events follow the chat stream's fragments (OpenAI's event shapes)."""

from __future__ import annotations

import json

import pytest

from actors.sessions.requests import new_turn
from cluster.errors import InvalidRequestError
from cluster.state import Message, SessionLimits
from deployments.ingress.output_processing import AnswerShaper
from deployments.messages import ChoiceDelta
from deployments.protocol import ChatCompletionChunk, ChatCompletionRequest
from deployments.responses.events import ResponseEvents
from deployments.responses.items import conversation_items, input_messages, model_view
from engine.types import RequestOutput

CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}


def stored_turn(items: list[dict]) -> list[dict]:
    """Input items as the session store keeps and gives them back."""
    op = new_turn([m.stored() for m in input_messages(items)], turn_id=0, now=1.0, limits=SessionLimits())
    return [m.as_turn() for m in op.messages]


def test_calls_and_results_are_stored_typed_and_listed_as_items():
    turn = stored_turn([{"role": "user", "content": "Weather?"}, CALL, RESULT])
    assert [m["role"] for m in turn] == ["user", "assistant", "user"]
    assert turn[1]["tool_items"] == [CALL] and turn[2]["tool_items"] == [RESULT]
    # the model still reads text: the call as the JSON it wrote, the result as a user turn
    assert json.loads(turn[1]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert "Sunny" in turn[2]["content"] and "call_1" in turn[2]["content"]
    items = conversation_items({"messages": turn})
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert {k: items[1][k] for k in ("call_id", "name", "arguments")} == {
        k: CALL[k] for k in ("call_id", "name", "arguments")
    }
    assert items[2]["output"] == "Sunny" and items[2]["call_id"] == "call_1"
    assert len({i["id"] for i in items}) == 3
    assert [i["type"] for i in conversation_items({"messages": turn}, start=2)] == ["function_call_output"]
    view = model_view(turn)  # what a history sends to the model: the stored text
    assert [m.as_dict() for m in view] == [{"role": m["role"], "content": m["content"]} for m in turn]


def test_parallel_calls_are_one_message_with_two_items():
    second = {**CALL, "call_id": "call_2", "arguments": '{"city": "Lima"}'}
    turn = stored_turn([{"role": "user", "content": "Both?"}, CALL, second])
    assert len(turn) == 2 and [t["call_id"] for t in turn[1]["tool_items"]] == ["call_1", "call_2"]
    items = conversation_items({"messages": turn})
    assert [i.get("call_id") for i in items] == [None, "call_1", "call_2"]


def test_a_tool_item_on_the_wrong_role_is_refused():
    with pytest.raises(ValueError, match="function_call item belongs to a assistant message"):
        Message(role="user", content="x", timestamp=0, turn_id=0, tool_items=[CALL])
    with pytest.raises(InvalidRequestError):
        new_turn([{"role": "assistant", "content": "x", "tool_items": [RESULT]}], turn_id=0, now=1.0,
                 limits=SessionLimits())


def chunk(content: str | None = None, calls: list[dict] | None = None, finish: str | None = None) -> ChatCompletionChunk:
    delta: dict = {}
    if content is not None:
        delta["content"] = content
    if calls is not None:
        delta["tool_calls"] = calls
    return ChatCompletionChunk.model_validate({
        "id": "c", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })


def test_streamed_call_fragments_become_argument_delta_events():
    events = ResponseEvents()
    out = []
    for c in (
        chunk(calls=[{"index": 0, "id": "call_9", "type": "function",
                      "function": {"name": "get_weather", "arguments": ""}}]),
        chunk(calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        chunk(calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}], finish="tool_calls"),
    ):
        out += events.on_chunk(c)
    closing, items = events.finish()
    out += closing
    kinds = [e["type"] for e in out]
    assert kinds == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["delta"] for e in out if e["type"].endswith(".delta")] == ['{"city": ', '"Oslo"}']
    assert out[0]["item"]["arguments"] == "" and out[0]["item"]["status"] == "in_progress"
    assert items == [{"type": "function_call", "id": out[0]["item"]["id"], "call_id": "call_9",
                      "name": "get_weather", "arguments": '{"city": "Oslo"}', "status": "completed"}]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert events.finish_reason == "tool_calls"


def test_streamed_text_opens_closes_one_message():
    events = ResponseEvents()
    out = events.on_chunk(chunk("Hel")) + events.on_chunk(chunk("lo", finish="stop"))
    closing, items = events.finish()
    kinds = [e["type"] for e in out + closing]
    assert kinds == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
    ]
    assert items[0]["content"][0]["text"] == "Hello" and closing[0]["text"] == "Hello"
    empty_closing, empty = ResponseEvents().finish()  # no text, no calls: an empty message
    assert empty[0]["type"] == "message" and empty[0]["content"][0]["text"] == ""
    assert empty_closing[-1]["type"] == "response.output_item.done"


def test_a_streamed_answer_is_stored_with_its_calls_typed():
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "time?"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}],
    })
    shaper = AnswerShaper(request, None)
    shown = shaper.feed(ChoiceDelta(0, RequestOutput("r", [1], '{"name": "get_time", "arguments": {"zone"')))
    shown += shaper.feed(ChoiceDelta(0, RequestOutput("r", [2], ': "UTC"}}', finish_reason="stop")))
    streamed = [d for p in shown for d in p.call_deltas or ()]
    assert streamed[0].function.name == "get_time" and streamed[0].id.startswith("call_")
    stored = shaper.stored()
    assert stored["tool_items"] == [
        {"type": "function_call", "call_id": streamed[0].id, "name": "get_time", "arguments": '{"zone": "UTC"}'}
    ]
    assert json.loads(stored["content"]) == {"name": "get_time", "arguments": {"zone": "UTC"}}
    plain = AnswerShaper(ChatCompletionRequest(model="m", messages=request.messages), None)
    plain.feed(ChoiceDelta(0, RequestOutput("r", [1], "plain text", finish_reason="stop")))
    assert plain.stored() == {"role": "assistant", "content": "plain text"}
