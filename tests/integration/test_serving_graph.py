"""The real Serve graph (ingress -> LLMServer -> rank actor -> FakeEngine) through the
Python handle API: the same pydantic models as HTTP, whole and streamed."""

from __future__ import annotations

import random

import pytest

from cluster.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    SessionInfo,
)
from engine.fake_engine import DEFAULT_REPLY, ByteTokenizer
from tests.support.serve_harness import FAKE_ENGINE, FAST_FAKE, app_config, wait_until

MODEL = "m-ai-tiny"


@pytest.fixture(scope="module")
def app(serve_cluster):
    # The serving graph on its own: the fake engine's fixed reply and byte tokens are the
    # expected values (the real engine behind the same graph: tests/e2e).
    deployed = serve_cluster.deploy(
        app_config(), prefix="graph", engine_cls=FAKE_ENGINE, engine_options=FAST_FAKE
    )
    yield deployed
    deployed.delete()


def chat_request(content: str = "Hello", **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": content}], **fields
    )


def test_chat_returns_the_engine_text_with_usage(app):
    request = chat_request(max_tokens=12, temperature=0.0)
    response = app.handle.chat.remote(request).result()

    assert isinstance(response, ChatCompletionResponse)
    assert response.model == MODEL
    assert response.choices[0].message.content == DEFAULT_REPLY[:12]  # one byte per token
    assert response.choices[0].finish_reason == "length"
    prompt_ids = ByteTokenizer().apply_chat_template([{"role": "user", "content": "Hello"}])
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt_ids) + 12


def test_chat_stream_chunks_add_up_to_the_whole_answer(app):
    request = chat_request(
        max_tokens=60, temperature=0.0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(app.handle.options(stream=True).chat_stream.remote(request))

    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY[:60]
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 60
    assert len({c.id for c in chunks}) == 1


def test_a_reply_shorter_than_max_tokens_ends_with_stop(app):
    response = app.handle.chat.remote(chat_request(max_tokens=1000, temperature=0.0)).result()
    assert response.choices[0].message.content == DEFAULT_REPLY
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == len(DEFAULT_REPLY.encode())


def test_stop_string_ends_the_answer_before_it(app):
    response = app.handle.chat.remote(
        chat_request(max_tokens=200, temperature=0.0, stop=["herds"])
    ).result()
    assert response.choices[0].message.content == DEFAULT_REPLY[: DEFAULT_REPLY.index("herds")]
    assert response.choices[0].finish_reason == "stop"


def test_completion_from_text_and_from_token_ids(app):
    by_text = app.handle.complete.remote(
        CompletionRequest(model=MODEL, prompt="Once upon", max_tokens=7, temperature=0.0)
    ).result()
    assert isinstance(by_text, CompletionResponse)
    assert by_text.choices[0].text == DEFAULT_REPLY[:7]
    assert by_text.usage.prompt_tokens == len(ByteTokenizer().encode("Once upon"))

    ids = [1, 80, 81, 82]
    chunks = list(
        app.handle.options(stream=True).complete_stream.remote(
            {
                "model": MODEL,
                "prompt": ids,
                "max_tokens": 9,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_REPLY[:9]
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_seed_makes_sampling_reproducible(app):
    def sample(seed: int) -> str:
        request = chat_request(max_tokens=80, temperature=1.0, seed=seed)
        return app.handle.chat.remote(request).result().choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_max_tokens_over_the_context_is_refused_naming_the_field(app):
    with pytest.raises(InvalidRequestError) as info:
        app.handle.chat.remote(chat_request(max_tokens=2048)).result()
    assert "is too large: 2048" in str(info.value)
    assert "maximum context length is 2048 tokens" in str(info.value)


def test_unknown_model_is_refused(app):
    request = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ModelNotFoundError, match="model='gpt-4' is not served here"):
        app.handle.chat.remote(request).result()


def test_sessions_keep_turns_per_tenant(app):
    session = app.handle.create_session.remote(
        {"system_prompt": "Be brief."}, tenant="acme"
    ).result()
    assert isinstance(session, SessionInfo) and session.turns == 0
    usage = []
    for turn in ("one", "two", "three"):
        request = chat_request(turn, max_tokens=5, temperature=0.0, session_id=session.id)
        response = app.handle.chat.remote(request, tenant="acme").result()
        assert response.session_id == session.id
        usage.append(response.usage.prompt_tokens)
    # Each turn's prompt holds the earlier turns: it grows by at least the last exchange.
    assert usage[0] < usage[1] < usage[2]
    stored = app.handle.get_session.remote(session.id, tenant="acme").result()
    assert [m["role"] for m in stored.messages] == ["user", "assistant"] * 3
    assert [m["content"] for m in stored.messages[::2]] == ["one", "two", "three"]
    assert stored.messages[1]["content"] == DEFAULT_REPLY[:5]

    with pytest.raises(NotFoundError):
        app.handle.get_session.remote(session.id, tenant="globex").result()
    listed = app.handle.list_sessions.remote(tenant="acme").result()
    assert session.id in [s.id for s in listed.data]
    app.handle.delete_session.remote(session.id, tenant="acme").result()
    with pytest.raises(NotFoundError):
        app.handle.get_session.remote(session.id, tenant="acme").result()


def test_streamed_session_turn_is_stored_once_finished(app):
    session = app.handle.create_session.remote().result()
    request = chat_request(
        "streamed", max_tokens=8, temperature=0.0, stream=True, session_id=session.id
    )
    list(app.handle.options(stream=True).chat_stream.remote(request))
    stored = app.handle.get_session.remote(session.id).result()
    assert stored.messages == [
        {"role": "user", "content": "streamed"},
        {"role": "assistant", "content": DEFAULT_REPLY[:8]},
    ]


def test_cancelling_a_handle_stream_frees_the_engine_slot(serve_cluster):
    slow = serve_cluster.deploy(
        app_config(),
        prefix="cancel",
        engine_cls=FAKE_ENGINE,  # a serving-graph test, see ``app``
        engine_options={"tokens_per_s": 20.0, "tokenizer": "bytes", "repeat": True},
    )
    try:
        stream = slow.handle.options(stream=True).chat_stream.remote(
            chat_request(max_tokens=2000, stream=True)
        )
        next(iter(stream))
        assert slow.llm().stats.remote().result()["running"] == 1
        stream.cancel()
        stats = wait_until(
            lambda: (s := slow.llm().stats.remote().result())["running"] == 0 and s,
            timeout_s=5,
            what="slot freed",
        )
        assert stats["generated_tokens"] < 200  # stopped long before max_tokens
    finally:
        slow.delete()


def test_many_concurrent_streams_all_complete(app):
    import asyncio

    async def run_all() -> list[str]:
        handle = app.handle.options(stream=True)

        async def one(i: int) -> str:
            request = chat_request(
                f"stream {i}", max_tokens=random.randint(20, 60), temperature=0.0, stream=True
            )
            return "".join(
                [c.choices[0].delta.content or "" async for c in handle.chat_stream.remote(request)]
            )

        return await asyncio.gather(*(one(i) for i in range(16)))

    texts = asyncio.run(run_all())
    assert all(DEFAULT_REPLY.startswith(t) and len(t) >= 20 for t in texts)
