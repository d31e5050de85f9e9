"""Bad input at the limits, over HTTP: a body above ``serving.max_request_bytes`` is a 413, too
many messages a 400 naming ``messages``, a prompt plus ``max_tokens`` beyond the context a
400 with the numbers and the words vLLM uses, and no answer ever carries a stack trace, not
even ``/health`` of a model whose replicas fail to start (its checkpoint does not exist)."""

from __future__ import annotations

from functools import cache

import httpx
import pytest

from deployments.protocol import MAX_MESSAGES
from tests.support.serve_harness import app_config

MODEL = "m-ai-tiny"
CONTEXT = 512
MAX_BYTES = 64 * 1024
MISSING_CHECKPOINT = "/nonexistent/m-ai-no-checkpoint"


@pytest.fixture(scope="module")
def http(serve_cluster):
    config = app_config(models=[{"context_length": CONTEXT}], max_request_bytes=MAX_BYTES)
    app = serve_cluster.deploy(config, prefix="limits")  # the real tiny engine
    with httpx.Client(base_url=app.url, timeout=30) as client:
        yield client
    app.delete()


def chat(content: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


@cache
def tokenizer():
    """The served model's tokenizer (the embedded tiny checkpoint's)."""
    from engine.tiny.checkpoint import ensure_tiny_checkpoint
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(ensure_tiny_checkpoint())


def prompt_tokens(content: str) -> int:
    """What the model's tokenizer makes of one user turn in its chat template."""
    return len(tokenizer().apply_chat_template([{"role": "user", "content": content}]))


def assert_clean(response: httpx.Response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_a_body_above_the_limit_is_a_413(http):
    response = http.post("/v1/chat/completions", json=chat("x" * (MAX_BYTES + 10)))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 413
    assert "max_request_bytes" in error["message"] and str(MAX_BYTES) in error["message"]
    assert_clean(response)
    # a body just within it is read and judged on its content (here: too long for the context)
    within = http.post("/v1/chat/completions", json=chat("x" * (MAX_BYTES - 200)))
    assert within.status_code == 400 and within.json()["error"]["param"] == "messages"


def test_too_many_messages_is_a_400_naming_messages(http):
    turns = [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": turns})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and str(MAX_MESSAGES) in error["message"]


def test_prompt_plus_max_tokens_over_the_context_gives_vllms_numbers(http):
    content = "Tell me about llamas."
    p = prompt_tokens(content)
    ok = http.post("/v1/chat/completions", json=chat(content, max_tokens=CONTEXT - p))
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == p

    c = CONTEXT - p + 1
    response = http.post("/v1/chat/completions", json=chat(content, max_tokens=c))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens"
    assert error["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: {c}. This model's maximum "
        f"context length is {CONTEXT} tokens and your request has {p} input tokens "
        f"({c} > {CONTEXT} - {p})."
    )
    streamed = http.post("/v1/chat/completions", json=chat(content, max_tokens=c, stream=True))
    assert streamed.status_code == 400 and streamed.json()["error"] == error


def test_a_prompt_alone_over_the_context_gives_vllms_numbers(http):
    content = "llama " * 400
    p = prompt_tokens(content)
    assert p >= CONTEXT
    response = http.post("/v1/chat/completions", json=chat(content))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert error["message"] == (
        f"This model's maximum context length is {CONTEXT} tokens. However, your request has "
        f"{p} input tokens. Please reduce the length of the input messages."
    )
    completion = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": content, "max_tokens": 4}
    )
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"
    assert "maximum context length is 512 tokens" in completion.json()["error"]["message"]


def test_health_of_a_model_that_cannot_start_carries_no_stack_trace(serve_cluster):
    from ray import serve

    name = None
    try:
        with pytest.raises(RuntimeError):  # serve.run reports the failed deployment
            serve_cluster.deploy(
                app_config(models=[{"checkpoint": MISSING_CHECKPOINT}]), prefix="nostart"
            )
        name = next(n for n in serve.status().applications if n.startswith("nostart-"))
        health = httpx.get(f"http://127.0.0.1:{serve_cluster.http_port}/{name}/health", timeout=30)
        assert health.status_code == 503, health.text
        message = health.json()["error"]["message"]
        # the cause, briefly (its middle elided): the checkpoint, and what to do
        assert "DEPLOY_FAILED" in message and "check the path" in message
        assert_clean(health)
        assert "\n" not in message and "\x1b" not in message
    finally:
        if name:
            serve.delete(name)
