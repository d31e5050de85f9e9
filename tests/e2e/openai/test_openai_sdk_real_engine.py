"""The OpenAI API as clients use it, on the real tiny engine over HTTP, with the official
``openai`` SDK: every request field M-AI implements, the ones it accepts and ignores or
refuses, tools in each ``tool_choice`` mode (whole and streamed), logprobs, ``n``,
embeddings, the Responses API (``previous_response_id`` across two ingress replicas and a
restart of the whole application) and conversations."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from cluster.config import build_app_config
from cluster.config.serving import hash_api_key
from deployments.http.replica_header import REPLICA_HEADER
from tests.support.serve_harness import FAST_SERVING, app_config

MODEL = "m-ai-tiny"
KEY = "sk-test-openai-sdk-0123456789"
KEY_OTHER = "sk-test-openai-other-987654"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Oslo", "Lima", "Pune"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


def make_config(tiny_checkpoint, state_uri: str):
    base = app_config()  # fresh memory folder; sessions are given explicitly (restart test)
    return build_app_config(
        {
            "serving": {
                **FAST_SERVING,
                "session_state_uri": state_uri,
                "session_store_shards": 2,
                "ingress_replicas": 2,
                "rank_num_cpus": 1.0,
                "api_keys": {hash_api_key(KEY): "acme", hash_api_key(KEY_OTHER): "globex"},
            },
            "memory": base.memory.model_dump(mode="json"),
            "models": [
                {"checkpoint": str(tiny_checkpoint), "max_num_seqs": 16, "max_tokens": 48,
                 "context_length": 1024}
            ],
        },
        "test config",
    )


@pytest.fixture(scope="module")
def state_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("openai-sessions"))


@pytest.fixture(scope="module")
def app(serve_cluster, tiny_checkpoint, state_uri):
    config = make_config(tiny_checkpoint, state_uri)
    deployed = serve_cluster.deploy(config, prefix="openai-sdk", engine_cls=None)  # real engine
    deployed.config = config
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(content: str = "Tell me about llamas.", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


# -- sampling fields ----------------------------------------------------------------------------


def test_n_choices_whole_and_streamed(client):
    whole = client.chat.completions.create(**ask(n=4, max_tokens=8, temperature=1.0, seed=3))
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in whole.choices}) > 1  # seeds 3..6: different samples
    assert 4 <= whole.usage.completion_tokens <= 4 * 8  # the four choices' tokens together
    stream = client.chat.completions.create(
        **ask(n=3, max_tokens=6, temperature=0), stream=True, stream_options={"include_usage": True}
    )
    texts: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert texts[0] == texts[1] == texts[2]  # greedy: n identical samples


def test_logprobs_chat_whole_and_streamed(client):
    whole = client.chat.completions.create(
        **ask(max_tokens=5, temperature=0, logprobs=True, top_logprobs=5)
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-5
        assert bytes(entry.bytes).decode("utf-8", "replace")
    streamed = []
    for chunk in client.chat.completions.create(
        **ask(max_tokens=5, temperature=0, logprobs=True, top_logprobs=2), stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content or []
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_logprobs_completions(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_penalties_logit_bias_and_max_completion_tokens(client):
    # a +100 bias on one token makes greedy decoding repeat it
    out = client.chat.completions.create(
        **ask(max_completion_tokens=4, temperature=0, logit_bias={"450": 100}, logprobs=True)
    )
    assert out.usage.completion_tokens == 4
    assert {e.token for e in out.choices[0].logprobs.content} == {out.choices[0].logprobs.content[0].token}
    penalized = client.chat.completions.create(
        **ask(max_tokens=24, temperature=0, presence_penalty=2.0, frequency_penalty=2.0, logprobs=True)
    )
    tokens = [e.token for e in penalized.choices[0].logprobs.content]
    plain = client.chat.completions.create(**ask(max_tokens=24, temperature=0, logprobs=True))
    plain_tokens = [e.token for e in plain.choices[0].logprobs.content]
    assert len(set(tokens)) / len(tokens) >= len(set(plain_tokens)) / len(plain_tokens)


def test_developer_role_and_tool_messages_are_accepted(client):
    out = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 20 C"},
        ],
        tools=[WEATHER],
    )
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_vllm_extras(client):
    out = client.chat.completions.create(**ask(
        max_tokens=8, temperature=0.8, seed=1,
        extra_body={"min_p": 0.1, "min_tokens": 8, "ignore_eos": True, "skip_special_tokens": True,
                    "stop_token_ids": [2], "top_k": 20, "repetition_penalty": 1.1},
    ))
    assert out.usage.completion_tokens == 8
    choice = client.chat.completions.create(**ask(max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}))
    assert choice.choices[0].message.content in ("yes", "no")
    choice = client.chat.completions.create(
        **ask(max_tokens=8, extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    )
    assert choice.choices[0].message.content in ("red", "blue")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    js = client.chat.completions.create(**ask(max_tokens=16, extra_body={"guided_json": schema}))
    jsonschema.validate(json.loads(js.choices[0].message.content), schema)
    free = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    stop = free.choices[0].text[4:6]
    kept = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].text.endswith(stop)


def test_inapplicable_fields_accepted_or_refused_by_name(client):
    ok = client.chat.completions.create(**ask(
        max_tokens=2, service_tier="auto", store=True, metadata={"k": "v"}, user="u1",
        prediction={"type": "content", "content": "x"}, modalities=["text"],
        safety_identifier="s", prompt_cache_key="p",
    ))
    assert ok.choices
    for field, value in (("audio", {"voice": "alloy", "format": "wav"}), ("reasoning_effort", "low"),
                         ("web_search_options", {})):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**ask(max_tokens=2), **{field: value})
        assert field in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask(max_tokens=2), extra_body={"not_a_field": 1})
    assert "not_a_field" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask(max_tokens=2, n=9))
    assert "n" in (err.value.body or {}).get("param", "n")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="y")
    assert "suffix" in err.value.message


# -- tools --------------------------------------------------------------------------------------


def check_calls(calls, allowed):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_and_named_give_schema_valid_calls(client, parallel):
    for seed in range(3):
        out = client.chat.completions.create(**ask(
            "What is the weather?", max_tokens=320, temperature=1.0, seed=seed, tools=[WEATHER, CLOCK],
            tool_choice="required", parallel_tool_calls=parallel,
        ))
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        if not parallel:
            assert len(choice.message.tool_calls) == 1
        named = client.chat.completions.create(**ask(
            max_tokens=160, temperature=1.0, seed=seed, tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=parallel,
        ))
        check_calls(named.choices[0].message.tool_calls, {"get_time"})


def test_tool_choice_none_and_auto_answer_text_or_calls(client):
    none = client.chat.completions.create(**ask(max_tokens=8, temperature=0, tools=[WEATHER], tool_choice="none"))
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None
    auto = client.chat.completions.create(**ask(max_tokens=8, temperature=0, tools=[WEATHER]))
    message = auto.choices[0].message
    assert (message.tool_calls is None) == (auto.choices[0].finish_reason != "tool_calls")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert "nope" in err.value.message


def test_streamed_tool_calls_have_openais_delta_shape(client):
    stream = client.chat.completions.create(**ask(
        max_tokens=160, temperature=1.0, seed=5, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, stream=True,
    ))
    calls: dict[int, dict] = {}
    reasons = []
    deltas = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or ():
                deltas.append(d)
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert [r for r in reasons if r] == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])
    # OpenAI's shape: the first delta names the call with empty arguments, fragments follow
    first = deltas[0]
    assert (first.type, first.function.name, first.function.arguments) == ("function", "get_weather", "")
    fragments = [d.function.arguments for d in deltas[1:]]
    assert len(fragments) > 1 and all(f and d.id is None for f, d in zip(fragments, deltas[1:]))


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_float_base64_and_batch(client, app):
    name = app.config.memory.embedder.name  # the tests' fast `hashing` embedder
    models = [m.id for m in client.models.list().data]
    assert models[0] == MODEL and name in models
    texts = ["llamas live in the Andes", "alpacas too", "stock prices fell"]
    floats = client.embeddings.create(model=name, input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model=name, input=texts)  # the SDK asks for base64
    assert [d.index for d in floats.data] == [0, 1, 2]
    for a, b in zip(floats.data, as_b64.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-4)
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    one = client.embeddings.create(model=name, input="llamas live in the Andes", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=name, input=[[1, 2, 3]])


# -- responses and conversations ----------------------------------------------------------------


def created_on(raw) -> tuple[object, str]:
    """A response and the ingress replica that made it (the diagnostic header)."""
    replica = raw.headers.get(REPLICA_HEADER)
    assert replica, f"no {REPLICA_HEADER} header"
    return raw.parse(), replica


def test_responses_chain_across_replicas_get_delete_and_tenants(client, app):
    first, replica = created_on(client.responses.with_raw_response.create(
        model=MODEL, input="My name is Ada.", instructions="Be brief.", max_output_tokens=8, temperature=0,
    ))
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    assert first.output[0].type == "message" and first.output_text == first.output[0].content[0].text
    chain, replicas = [first], [replica]
    # Two ingress replicas, the chain in the session store: continue it until a response made
    # on one replica has been continued on the other (Serve picks the replica; bounded).
    for turn in range(24):
        hopped = any(a != b for a, b in zip(replicas, replicas[1:]))
        if hopped and len(chain) >= 5:
            break
        response, replica = created_on(client.responses.with_raw_response.create(
            model=MODEL, input=f"Turn {turn}", previous_response_id=chain[-1].id, max_output_tokens=6, temperature=0,
        ))
        assert response.previous_response_id == chain[-1].id
        chain.append(response)
        replicas.append(replica)
    assert len(set(replicas)) == 2, f"one replica answered all {len(replicas)} requests"
    assert any(a != b for a, b in zip(replicas, replicas[1:]))
    assert len({r.id for r in chain}) == len(chain)
    got = client.responses.retrieve(chain[2].id)
    assert got.id == chain[2].id and got.output_text == chain[2].output_text
    assert got.previous_response_id == chain[1].id
    # a fork from an earlier response continues from its history, not the latest
    fork = client.responses.create(model=MODEL, input="Fork", previous_response_id=chain[1].id, max_output_tokens=4)
    assert fork.id not in {r.id for r in chain}
    other = openai.OpenAI(base_url=f"{app.url}/v1", api_key=KEY_OTHER, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=first.id)
    client.responses.delete(chain[-1].id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(chain[-1].id)
    unstored = client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2,
                                       previous_response_id=chain[0].id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_responses_stream_typed_events_and_tools(client):
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.output_text == deltas and events[0].response.id == done.id
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert client.responses.retrieve(done.id).output_text == deltas
    tool = WEATHER["function"]
    called = client.responses.create(
        model=MODEL, input="Weather?", tools=[{"type": "function", **tool}], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=160, temperature=0,
    )
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    answer = client.responses.create(
        model=MODEL, previous_response_id=called.id, max_output_tokens=6,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
    )
    assert answer.output[0].type in ("message", "function_call")
    streamed = list(client.responses.create(
        model=MODEL, input="Weather?", tools=[{"type": "function", **tool}], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=160, temperature=0, stream=True,
    ))
    kinds = [e.type for e in streamed]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    fragments = [e.delta for e in streamed if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(fragments) > 1 and "".join(fragments) == done.arguments
    jsonschema.validate(json.loads(done.arguments), SCHEMAS["get_weather"])
    assert streamed[-1].response.output[0].arguments == done.arguments


LONG = "Llamas live in the high Andes and eat grass. " * 40  # about 600 of the 1024 tokens


def test_truncation_disabled_refuses_an_over_long_chain_and_auto_drops_the_oldest(client):
    first = client.responses.create(model=MODEL, input=LONG, max_output_tokens=4, temperature=0)
    assert 500 < first.usage.input_tokens < 1024 - 4  # one fits, two do not
    for stream in (False, True):  # OpenAI's default: nothing is dropped, the request is refused
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input=LONG, previous_response_id=first.id,
                                    max_output_tokens=4, stream=stream)
        assert "maximum context length is 1024 tokens" in err.value.message
        assert "truncation" in err.value.message and err.value.param == "input"
    auto = client.responses.create(model=MODEL, input=LONG, previous_response_id=first.id, truncation="auto",
                                   instructions="Answer in one word.", max_output_tokens=4, temperature=0)
    assert auto.truncation == "auto" and auto.previous_response_id == first.id
    assert first.usage.input_tokens <= auto.usage.input_tokens <= 1024 - 4
    # the refused requests stored nothing: the chain goes on from the auto response
    later = client.responses.create(model=MODEL, input="Where?", previous_response_id=auto.id, truncation="auto",
                                    max_output_tokens=4)
    assert later.previous_response_id == auto.id


def test_tool_calls_and_results_round_trip_as_typed_items(client, app):
    import httpx

    tool = {"type": "function", **WEATHER["function"]}
    conv = client.conversations.create()
    called = client.responses.create(
        model=MODEL, conversation=conv.id, input="Weather in Oslo?", tools=[tool], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=160, temperature=0,
    )
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    kept = client.responses.retrieve(called.id).output[0]
    assert (kept.type, kept.call_id, kept.name, kept.arguments) == ("function_call", call.call_id, call.name, call.arguments)
    client.responses.create(
        model=MODEL, conversation=conv.id, tools=[tool], max_output_tokens=6, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
    )
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in items[:3]] == ["message", "function_call", "function_call_output"]
    assert (items[1].call_id, items[1].name, items[1].arguments) == (call.call_id, "get_weather", call.arguments)
    assert (items[2].call_id, items[2].output) == (call.call_id, "Sunny, 21 C")
    # A chain by previous_response_id: the client's own call and result items, then a fork from
    # the first response, keep their types in the session store (GET /v1/sessions/{id}).
    mine = {"type": "function_call", "call_id": "call_mine", "name": "get_weather",
            "arguments": '{"city": "Lima", "days": 2}'}
    text_only = {"model": MODEL, "tools": [tool], "tool_choice": "none", "max_output_tokens": 4, "temperature": 0}
    result = {"type": "function_call_output", "call_id": "call_mine", "output": "Rain"}
    first = client.responses.create(input=[{"role": "user", "content": "Lima?"}, mine, result], **text_only)
    second = client.responses.create(previous_response_id=first.id, input="And tomorrow?", **text_only)
    fork = client.responses.create(previous_response_id=first.id, input="Thanks.", **text_only)
    sessions = httpx.Client(base_url=f"{app.url}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    for response in (second, fork):
        session_id = "sess-" + response.id.removeprefix("resp_").rpartition(".")[0]
        stored = sessions.get(f"/sessions/{session_id}").json()["messages"]
        assert [m["tool_items"] for m in stored if m.get("tool_items")] == [[mine], [result]]
    assert second.id.rpartition(".")[0] != fork.id.rpartition(".")[0]  # the fork is a new session


def test_conversations_create_items_respond_delete(client):
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "I live in Oslo."}],
                                       metadata={"topic": "home"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "home"}
    added = client.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Noted."}]}
    ])
    assert [i.role for i in added.data] == ["assistant"]
    reply = client.responses.create(model=MODEL, conversation=conv.id, input="Where do I live?", max_output_tokens=6)
    items = client.conversations.items.list(conv.id, order="asc")
    texts = [i.content[0].text for i in items.data]
    assert texts[:3] == ["I live in Oslo.", "Noted.", "Where do I live?"]
    assert texts[3] == reply.output_text
    client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_stored_responses_feed_the_users_memory(client):
    import httpx

    from tests.support.serve_harness import wait_until

    client.responses.create(model=MODEL, input="My name is Ivo. I live in Quito.", user="ivo",
                            max_output_tokens=4, temperature=0)
    memories = httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def kept() -> list[str]:
        return [m["text"] for m in memories.get("memories", params={"user": "ivo"}).json()["data"]]

    found = wait_until(lambda: [t for t in kept() if "Quito" in t], timeout_s=60, what="a memory of Quito")
    assert found


def test_a_response_survives_a_restart_of_the_application(serve_cluster, app, client):
    kept = client.responses.create(model=MODEL, input="Remember: blue.", max_output_tokens=6, temperature=0)
    app.delete()
    again = serve_cluster.deploy(app.config, engine_cls=None, name=app.name)
    assert again.url == app.url
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    later = client.responses.create(model=MODEL, input="What colour?", previous_response_id=kept.id, max_output_tokens=4)
    assert later.previous_response_id == kept.id
