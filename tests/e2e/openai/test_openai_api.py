"""The HTTP API through the official ``openai`` client (and raw HTTP where the status, the
headers or the exact error body matter): completions whole and streamed, models, sessions,
API keys and every kind of bad input."""

from __future__ import annotations

import httpx
import openai
import pytest

from cluster.config.serving import hash_api_key
from tests.support.serve_harness import app_config

MODEL = "m-ai-tiny"
KEY_ACME = "sk-test-acme-0123456789"
KEY_GLOBEX = "sk-test-globex-9876543210"


@pytest.fixture(scope="module")
def app(serve_cluster):
    config = app_config(
        api_keys={hash_api_key(KEY_ACME): "acme", hash_api_key(KEY_GLOBEX): "globex"},
        session_store_shards=2,
        # No recalled facts in the prompt: a session's prompt is then its conversation, token
        # for token (memory in the prompt: tests/e2e/test_memory_http.py).
        memory={"retrieval": {"top_k": 0}, "units": {"max_units": 0}},
    )
    deployed = serve_cluster.deploy(config, prefix="openai")  # the real tiny engine
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=KEY_ACME, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The served model's tokenizer: the counts in ``usage`` are its counts."""
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(
        base_url=app.url, headers={"Authorization": f"Bearer {KEY_ACME}"}, timeout=30
    ) as c:
        yield c


def ask(content: str, **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "hashing"]  # then the embedding model


def test_chat_completion_whole_and_streamed_agree(client, tokenizer):
    # ignore_eos: exactly max_tokens tokens, whatever the random-weight model samples
    exact = {"ignore_eos": True}
    whole = client.chat.completions.create(
        **ask("Tell me about llamas", max_tokens=20, temperature=0), extra_body=exact
    )
    choice = whole.choices[0]
    assert choice.message.content
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert whole.usage.completion_tokens == 20
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about llamas"}])
    assert whole.usage.prompt_tokens == len(prompt)  # counted by the model's tokenizer
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 20

    stream = client.chat.completions.create(
        **ask("Tell me about llamas", max_tokens=20, temperature=0),
        extra_body=exact,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == choice.message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completion_whole_and_streamed(client):
    exact = {"ignore_eos": True}  # exactly max_tokens tokens
    whole = client.completions.create(
        model=MODEL, prompt="Llamas live in", max_tokens=8, temperature=0, extra_body=exact
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Llamas live in", max_tokens=8, temperature=0, stream=True,
            extra_body=exact,
        )
    )
    assert streamed == whole.choices[0].text


def test_stop_and_seed_and_user_are_accepted(client):
    # Greedy decoding gives the same text twice: a stop string taken from the middle of the
    # first answer ends the second one right before it.
    body = ask("alpha beta gamma", max_tokens=40, temperature=0, seed=3, user="u-1")
    full = client.chat.completions.create(**body, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = text[len(text) // 2 :][:3]
    assert len(stop) == 3 and stop.strip(), text
    reply = client.chat.completions.create(**body, stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.usage.completion_tokens < full.usage.completion_tokens == 40


def test_a_session_carries_the_conversation_across_three_turns(client, http, tokenizer):
    session = http.post("/v1/sessions", json={"system_prompt": "You are terse."})
    assert session.status_code == 201
    sid = session.json()["id"]

    replies = []
    for turn in ("my name is Ada", "I keep llamas", "what is my name"):
        reply = client.chat.completions.create(
            **ask(turn, max_tokens=12, temperature=0), extra_body={"session_id": sid}
        )
        replies.append(reply)
    # The server put the earlier turns (and the system prompt) in front of the last one:
    # the last prompt is the whole conversation in the model's chat template, token for token.
    history = [{"role": "system", "content": "You are terse."}]
    for turn, reply in zip(("my name is Ada", "I keep llamas", "what is my name"), replies):
        history.append({"role": "user", "content": turn})
        if reply is not replies[2]:
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert replies[2].usage.prompt_tokens == len(tokenizer.apply_chat_template(history))
    assert (
        replies[0].usage.prompt_tokens
        < replies[1].usage.prompt_tokens
        < replies[2].usage.prompt_tokens
    )

    stored = http.get(f"/v1/sessions/{sid}").json()
    assert stored["turns"] == 3 and stored["message_count"] == 6  # three exchanges
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        "my name is Ada",
        "I keep llamas",
        "what is my name",
    ]
    assert sid in [s["id"] for s in http.get("/v1/sessions").json()["data"]]

    assert http.delete(f"/v1/sessions/{sid}").json() == {
        "id": sid,
        "object": "session.deleted",
        "deleted": True,
    }
    with pytest.raises(openai.NotFoundError) as gone:
        client.chat.completions.create(**ask("hello?"), extra_body={"session_id": sid})
    assert gone.value.body["param"] == "session_id"


def test_api_keys_authenticate_and_separate_tenants(app, client, http):
    assert httpx.get(f"{app.url}/health").status_code == 200  # health needs no key
    no_key = httpx.post(f"{app.url}/v1/chat/completions", json=ask("hi"))
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app.url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    sid = http.post("/v1/sessions").json()["id"]
    other = httpx.get(
        f"{app.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_GLOBEX}"}
    )
    assert other.status_code == 404
    assert sid not in [
        s["id"]
        for s in httpx.get(
            f"{app.url}/v1/sessions", headers={"Authorization": f"Bearer {KEY_GLOBEX}"}
        ).json()["data"]
    ]


LONG_PROMPT = "llama " * 3000

BAD_INPUTS = [
    # (body, param, words in the message)
    (ask("hi", max_tokens=4000), "max_tokens", "context length"),
    (ask(LONG_PROMPT), "messages", "context length"),
    (ask("hi", temperature="hot"), "temperature", "valid number"),
    (ask("hi", max_tokens="ten"), "max_tokens", "valid integer"),
    (ask("hi", temperature=3), "temperature", "less than or equal to 2"),
    ({"model": MODEL, "messages": []}, "messages", "at least 1 item"),
    ({"model": MODEL}, "messages", "Field required"),
    (
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
        "'developer'",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": 7}]},
        "messages[0].content",
        "wrong type",
    ),
    (ask("hi", n=9), "n", "less than or equal to 8"),
    (
        ask("hi", stream_options={"include_usage": True}),
        "stream_options",
        "only allowed with stream=true",
    ),
    (ask("hi", stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (ask("hi", logit_bias={"x": 2}), "logit_bias", "not a token id"),
    (ask("hi", reasoning_effort="low"), "reasoning_effort", "reasoning models only"),
]


@pytest.mark.parametrize(
    ("body", "param", "words"), BAD_INPUTS, ids=[b[1] + ":" + b[2][:20] for b in BAD_INPUTS]
)
def test_bad_chat_input_is_a_400_naming_the_field(http, body, param, words):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_an_unknown_model_is_a_404_as_openai_answers_it(http):
    response = http.post("/v1/chat/completions", json=ask("hi") | {"model": "gpt-4"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "not served here" in error["message"] and MODEL in error["message"]


def test_bad_streamed_input_is_a_400_too_not_a_broken_stream(http):
    response = http.post("/v1/chat/completions", json=ask("hi", max_tokens=5000, stream=True))
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_bad_completion_input_and_broken_json(http):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert (
        response.status_code == 400
        and "one prompt per request" in response.json()["error"]["message"]
    )
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_the_openai_client_sees_a_400_as_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ask("hi", max_tokens=4000))
    assert info.value.body["param"] == "max_tokens"


def test_unknown_routes_answer_in_the_openai_error_format(http):
    response = http.get("/v1/engines")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
