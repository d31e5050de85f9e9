"""OpenAI request fields at the boundary (accepted, ignored or refused by name), tools in and
out of the Llama 2 prompt, the chunks of streamed tool calls, and Responses API items."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.config import ModelConfig
from cluster.errors import InvalidRequestError
from deployments.errors import validation_error
from deployments.ingress.openai_api.inputs import sampling_params
from deployments.ingress.openai_api.outputs import ChatChunks, chat_response
from deployments.ingress.openai_api.tool_calls import call_schema, llama_messages, parse_tool_calls
from deployments.ingress.output_processing import AnswerShaper, whole_answer
from deployments.messages import ChoiceDelta
from deployments.protocol import ChatCompletionRequest, CompletionRequest, SessionTurnRequest
from deployments.responses.items import input_messages, output_items
from engine.types import RequestOutput

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


class StreamedChunks:
    """A streamed chat's chunks as the ingress builds them (tool calls parsed out first):
    ``chunk(out)`` is the first chunk the engine's delta ``out`` makes, or None."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.shaper = AnswerShaper(request, None)
        self.builder = ChatChunks("m", request.n, self.shaper.texts)

    def chunk(self, out: RequestOutput):
        chunks = [self.builder.chunk(p) for p in self.shaper.feed(ChoiceDelta(0, out))]
        return next((c for c in chunks if c is not None), None)


def whole_chat(outs: list[RequestOutput], request: ChatCompletionRequest):
    choices, shaper = whole_answer(request, [ChoiceDelta(i, o) for i, o in enumerate(outs)], None)
    return chat_response(choices, "m", shaper.usage(), shaper.texts)


def refused(**fields) -> InvalidRequestError:
    with pytest.raises(ValidationError) as err:
        chat(**fields)
    return validation_error(err.value.errors())


@pytest.mark.parametrize("field,value,why", [
    ("audio", {"voice": "alloy"}, "audio model"),
    ("reasoning_effort", "low", "reasoning models"),
    ("verbosity", "low", "reasoning models"),
    ("web_search_options", {}, "web search"),
    ("modalities", ["text", "audio"], "text only"),
    ("n", 9, "less than or equal to 8"),
    ("top_logprobs", 21, "less than or equal to 20"),
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("logit_bias", {"1": 101.0}, "outside [-100, 100]"),
    ("not_a_field", 1, "Extra inputs"),
])
def test_refused_fields_are_named_with_the_reason(field, value, why):
    error = refused(**{field: value})
    assert error.param == field and why in error.message


def test_accepted_fields_that_do_not_change_the_answer():
    request = chat(service_tier="flex", store=True, metadata={"a": "b"}, prediction={"type": "content", "content": "x"},
                   prompt_cache_key="k", safety_identifier="s", modalities=["text"], user="u")
    params = sampling_params(request, ModelConfig(model_size="tiny"), 10, "messages")
    assert params == sampling_params(chat(), ModelConfig(model_size="tiny"), 10, "messages")


def test_sampling_fields_reach_the_engine():
    request = chat(n=3, logprobs=True, top_logprobs=4, presence_penalty=0.5, frequency_penalty=-1.0,
                   logit_bias={"7": -100}, min_p=0.1, min_tokens=2, stop_token_ids=[5],
                   include_stop_str_in_output=True, skip_special_tokens=False)
    p = sampling_params(request, ModelConfig(model_size="tiny"), 10, "messages")
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty, p.logit_bias) == (4, 0.5, -1.0, ((7, -100.0),))
    assert (p.min_p, p.min_tokens, p.stop_token_ids, p.include_stop_str_in_output, p.skip_special_tokens) == (
        0.1, 2, (5,), True, False)
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 2})
    assert sampling_params(completion, ModelConfig(model_size="tiny"), 1, "prompt").logprobs == 2


def test_guided_fields_map_onto_structured_output_and_conflicts_are_refused():
    cfg = ModelConfig(model_size="tiny")
    p = sampling_params(chat(guided_choice=["a.b", "c"]), cfg, 5, "messages")
    assert p.guided == {"regex": r"(a\.b|c)"}
    p = sampling_params(chat(structured_outputs={"json": {"type": "object"}}), cfg, 5, "messages")
    assert p.response_format["json_schema"]["schema"] == {"type": "object"}
    with pytest.raises(InvalidRequestError, match="both constrain"):
        sampling_params(chat(guided_regex="a+", response_format={"type": "json_object"}), cfg, 5, "messages")
    with pytest.raises(InvalidRequestError, match="both constrain"):
        sampling_params(chat(tools=[TOOL], tool_choice="required", guided_regex="a"), cfg, 5, "messages")


def test_tool_choice_rules():
    assert refused(tool_choice="required").param == "tool_choice"
    error = refused(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}})
    assert "other" in error.message
    legacy = chat(functions=[TOOL["function"]], function_call={"name": "get_weather"})
    assert legacy.tools[0].function.name == "get_weather" and legacy.tool_mode == "named"


def test_tools_and_tool_turns_become_llama_2_turns():
    request = chat(
        tools=[TOOL],
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "developer", "content": "Be brief."},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    )
    turns = llama_messages(request)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert "Be brief." in turns[0]["content"] and "get_weather" in turns[0]["content"]
    assert json.loads(turns[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert turns[3]["content"].startswith("[result of tool call call_1]") and "And tomorrow?" in turns[3]["content"]


def test_call_schema_and_parsing():
    required = chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    schema = call_schema(required)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert call_schema(chat(tools=[TOOL], tool_choice="required"))["type"] == "array"
    auto = chat(tools=[TOOL])
    calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Lima"}}', auto)
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Lima"}
    assert parse_tool_calls("The weather is fine.", auto) is None
    assert parse_tool_calls('{"name": "unknown", "arguments": {}}', auto) is None


def test_streamed_tool_call_deltas_have_openais_shape():
    request = chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = StreamedChunks(request)
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    out = [chunks.chunk(RequestOutput("r", token_ids=[1], text=text[:10]))]
    out.append(chunks.chunk(RequestOutput("r", token_ids=[2], text=text[10:], finish_reason="stop")))
    first, last = out
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    deltas = [c for c in last.choices if c.delta.tool_calls]
    calls = [d for c in deltas for d in c.delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments + calls[1].function.arguments) == {"city": "Oslo"}
    assert last.choices[-1].finish_reason == "tool_calls"
    whole = whole_chat([RequestOutput("r", token_ids=[1], text=text, finish_reason="stop")], request)
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None


def test_a_constrained_call_streams_its_arguments_as_they_are_decoded():
    request = chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False, stream=True)
    shaper = AnswerShaper(request, None)
    builder = ChatChunks("m", request.n, shaper.texts)
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    cuts = [0, 30, 45, len(text)]
    chunks = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        finish = "stop" if b == len(text) else None
        out = RequestOutput("r", token_ids=[i], text=text[a:b], finish_reason=finish)
        chunks.append([c for p in shaper.feed(ChoiceDelta(0, out)) if (c := builder.chunk(p)) is not None])
    calls = [d for step in chunks for c in step for ch in c.choices for d in ch.delta.tool_calls or ()]
    # the call's head (id, type, name, empty arguments) goes out before the generation ends
    mid = [d for c in chunks[0] + chunks[1] for ch in c.choices for d in ch.delta.tool_calls or ()]
    assert mid[0].id.startswith("call_") and mid[0].function.name == "get_weather" and mid[0].function.arguments == ""
    assert len(mid) == 2 and mid[1].function.arguments  # and a first fragment of the arguments
    assert json.loads("".join(d.function.arguments or "" for d in calls)) == {"city": "Oslo"}
    assert chunks[-1][-1].choices[-1].finish_reason == "tool_calls"
    assert json.loads(shaper.stored()["tool_items"][0]["arguments"]) == {"city": "Oslo"}


def test_auto_mode_streams_plain_text_at_once():
    chunks = StreamedChunks(chat(tools=[TOOL], stream=True))
    first = chunks.chunk(RequestOutput("r", token_ids=[1], text="Hello"))
    assert first.choices[0].delta.content == "Hello"


def test_response_input_items_become_chat_messages():
    messages = input_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
    ])
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    with pytest.raises(InvalidRequestError) as err:
        input_messages([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
    assert err.value.param == "input[0].content[0].type"
    items = output_items(None, "hi")
    assert items[0]["content"][0] == {"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}


def test_a_session_turn_becomes_a_chat_request_of_the_session_its_path_names():
    turn = SessionTurnRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
         "user": "ada"}
    )
    request = turn.in_session("sess-1")
    assert type(request) is ChatCompletionRequest and request.session_id == "sess-1"
    assert (request.max_tokens, request.user, request.messages) == (5, "ada", turn.messages)
    with pytest.raises(ValidationError) as info:  # the body cannot name another session
        SessionTurnRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "session_id": "sess-2"})
    assert validation_error(info.value.errors()).param == "session_id"
