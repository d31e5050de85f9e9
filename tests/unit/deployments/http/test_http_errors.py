"""HTTP answers that clients and tools rely on: a 405 lists in ``Allow`` every method the spec
documents for the path; error messages never show a server path or Ray's class names."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.errors import as_mai_error, brief
from deployments.http.app import create_http_app
from deployments.http.openapi import build_openapi

SPEC_PATHS = build_openapi()["paths"]


@pytest.fixture(scope="module")
def client():
    return TestClient(create_http_app(None))


@pytest.mark.parametrize(
    ("path", "spec_path"),
    [
        ("/v1/memories", "/v1/memories"),
        ("/v1/memories/mem-1", "/v1/memories/{memory_id}"),
        ("/v1/sessions", "/v1/sessions"),
        ("/v1/sessions/sess-1", "/v1/sessions/{session_id}"),
        ("/v1/chat/completions", "/v1/chat/completions"),
    ],
)
def test_a_405_allows_every_documented_method(client, path, spec_path):
    documented = {m.upper() for m in SPEC_PATHS[spec_path]}
    response = client.request("PUT", path, json={})
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert documented <= allowed, (documented, allowed)
    assert allowed - documented <= {"HEAD"}
    assert response.json()["error"]["code"] == 405


def test_server_paths_never_reach_a_client():
    message = brief("OSError: [Errno 36] File name too long: '/srv/m-ai/memory/tenants/acme/"
                    + "u" * 300 + "/facts.parquet.1a2b.tmp'")
    assert "/srv" not in message and "tenants" not in message
    assert message.startswith("OSError: [Errno 36] File name too long")
    assert "<server path>" in message
    wrapped = as_mai_error(FileNotFoundError(2, "No such file", "/var/lib/m-ai/x/y.parquet"))
    assert "/var/lib" not in wrapped.message


def test_a_dead_actor_is_named_in_our_words():
    import ray.exceptions

    for exc in (ray.exceptions.ActorDiedError(), ray.exceptions.ActorUnavailableError("gone", b"0" * 16)):
        err = as_mai_error(exc, "the memory shard 0")
        assert err.status_code == 503
        assert err.message.startswith("the memory shard 0 is unavailable")
        assert "Error" not in err.message and "Actor" not in err.message


def test_a_fixed_path_beside_a_parameter_allows_its_own_methods(client):
    response = client.request("OPTIONS", "/v1/memories/usage")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["Allow"].split(",")} == {"GET", "HEAD"}
