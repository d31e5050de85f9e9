"""``POST /v1/sessions/{session_id}/context`` at the HTTP boundary: the key is checked and the
body validated as a chat turn before the ingress is asked; a bad body is a 400 naming the field,
a ``session_id`` in the body (the path names the session) included. The preview itself runs on
the real engine in tests/e2e/test_memory_http.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cluster.config.serving import ServingConfig, hash_api_key
from deployments.http.app import create_http_app
from deployments.ingress.auth import ApiKeyAuth
from deployments.protocol import ChatCompletionRequest, SessionContextPreview

KEY = "sk-test-route-0123456789"
TURN = {"model": "m-ai-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class PreviewOnly:
    """What the route needs of the ``Ingress``: its auth and serving config, ``preview_context``."""

    def __init__(self) -> None:
        self.serving = ServingConfig(api_keys={hash_api_key(KEY): "acme"})
        self.auth = ApiKeyAuth(self.serving)
        self.calls: list[tuple[str, ChatCompletionRequest, str]] = []

    async def preview_context(self, session_id, body, tenant) -> SessionContextPreview:
        request = body.in_session(session_id)
        self.calls.append((session_id, request, tenant))
        messages = [m.as_dict() for m in request.messages]
        return SessionContextPreview(
            session_id=session_id, model=request.model, memory=False, messages=messages, prompt_tokens=9
        )


@pytest.fixture
def ingress() -> PreviewOnly:
    return PreviewOnly()


@pytest.fixture
def client(ingress) -> TestClient:
    return TestClient(create_http_app(ingress), headers={"Authorization": f"Bearer {KEY}"})


def test_a_chat_turn_reaches_the_ingress_as_a_turn_of_the_paths_session(client, ingress):
    response = client.post("/v1/sessions/sess-1/context", json={**TURN, "user": "ada"})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "session.context"
    assert response.json()["messages"] == [{"role": "user", "content": "hi"}]
    [(session_id, request, tenant)] = ingress.calls
    assert (session_id, tenant) == ("sess-1", "acme")
    assert isinstance(request, ChatCompletionRequest) and request.session_id == "sess-1"
    assert (request.user, request.max_tokens) == ("ada", 4)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"session_id": "sess-2"}, "session_id"),  # the path names the session
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"model": None}, "model"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_body_is_a_400_naming_the_field(client, ingress, change, param):
    body = {k: v for k, v in {**TURN, **change}.items() if v is not None}
    response = client.post("/v1/sessions/sess-1/context", json=body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"] or "").startswith(param), response.json()
    assert ingress.calls == []


def test_a_body_that_is_no_json_object_is_a_400(client, ingress):
    response = client.post(
        "/v1/sessions/sess-1/context", content=b"not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and ingress.calls == []


def test_without_a_valid_key_it_is_a_401(ingress):
    plain = TestClient(create_http_app(ingress))
    assert plain.post("/v1/sessions/sess-1/context", json=TURN).status_code == 401
    wrong = plain.post(
        "/v1/sessions/sess-1/context", json=TURN, headers={"Authorization": "Bearer sk-wrong-0000000000"}
    )
    assert wrong.status_code == 401 and ingress.calls == []
