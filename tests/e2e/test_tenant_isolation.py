"""Tenants are isolated on every endpoint that holds data: one tenant can neither read, list,
continue, change nor delete another's sessions or memories, and never receives a response
that the cache holds for another tenant. Another tenant's object reads as "not found" (404),
the same answer as an id that does not exist, so ids cannot be probed either.
"""

from __future__ import annotations

import httpx
import pytest

from cluster.config.serving import hash_api_key
from tests.support.serve_harness import app_config

MODEL = "m-ai-tiny"
KEYS = {"acme": "sk-iso-acme-0123456789", "globex": "sk-iso-globex-9876543210"}


@pytest.fixture(scope="module")
def app(serve_cluster):
    config = app_config(
        api_keys={hash_api_key(key): tenant for tenant, key in KEYS.items()},
        session_store_shards=2,
        response_cache={"max_entries": 64},
    )
    deployed = serve_cluster.deploy(config, prefix="tenants")  # the real engine
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def acme(app):
    with httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def globex(app):
    with httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {KEYS['globex']}"}, timeout=30) as c:
        yield c


def ask(content: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def assert_not_found(response: httpx.Response, param: str | None = None) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "not_found_error"
    if param:
        assert error["param"] == param


def test_sessions_are_invisible_to_other_tenants(acme, globex):
    sid = acme.post("/v1/sessions", json={"system_prompt": "acme secret plan"}).json()["id"]
    turn = acme.post("/v1/chat/completions", json=ask("acme turn one", max_tokens=64, session_id=sid))
    assert turn.status_code == 200

    # globex: read, list, continue, delete -- all as if the session did not exist
    missing = globex.get("/v1/sessions/sess-00000000000000000000000000000000")
    assert_not_found(missing, "session_id")
    other = globex.get(f"/v1/sessions/{sid}")
    assert_not_found(other, "session_id")
    assert other.json()["error"]["message"].replace(sid, "ID") == missing.json()["error"][
        "message"
    ].replace("sess-00000000000000000000000000000000", "ID")
    assert sid not in [s["id"] for s in globex.get("/v1/sessions").json()["data"]]
    hijack = globex.post("/v1/chat/completions", json=ask("globex turn", max_tokens=64, session_id=sid))
    assert_not_found(hijack, "session_id")
    streamed = globex.post(
        "/v1/chat/completions", json=ask("globex turn", max_tokens=64, session_id=sid, stream=True)
    )
    assert_not_found(streamed, "session_id")
    assert_not_found(globex.delete(f"/v1/sessions/{sid}"), "session_id")

    # acme's session is untouched: its one turn, no trace of globex
    stored = acme.get(f"/v1/sessions/{sid}").json()
    assert stored["turns"] == 1 and stored["message_count"] == 2 and stored["system_prompt"] == "acme secret plan"
    assert all("globex" not in m["content"] for m in stored["messages"])
    assert acme.delete(f"/v1/sessions/{sid}").status_code == 200


def test_the_response_cache_never_answers_across_tenants(acme, globex):
    body = ask("cache me please", max_tokens=32, temperature=0)
    first = acme.post("/v1/chat/completions", json=body).json()
    again = acme.post("/v1/chat/completions", json=body).json()
    assert again["id"] == first["id"]  # acme's repeat is a cache hit: the stored response
    theirs = globex.post("/v1/chat/completions", json=body).json()
    assert theirs["id"] != first["id"]  # globex got its own answer, not acme's cached one
    # generated anew, greedily: the same text
    assert theirs["choices"][0]["message"] == first["choices"][0]["message"]
    assert globex.post("/v1/chat/completions", json=body).json()["id"] == theirs["id"]


def memory_routes(client: httpx.Client) -> bool:
    return "/v1/memories" in client.get("/openapi.json").json()["paths"]


def test_memories_are_invisible_to_other_tenants(acme, globex):
    if not memory_routes(acme):
        pytest.skip("this build serves no memory routes")
    added = acme.post(
        "/v1/memories", json={"user": "ada", "text": "Ada keeps three llamas in Oslo."}
    )
    assert added.status_code == 200, added.text
    memory_id = added.json()["memory"]["id"]

    # same user name, other tenant: a different person with no memories
    assert globex.get("/v1/memories", params={"user": "ada"}).json()["data"] == []
    found = globex.post("/v1/memories/search", json={"user": "ada", "query": "llamas Oslo"})
    assert found.status_code == 200 and found.json()["data"] == []
    assert_not_found(globex.get(f"/v1/memories/{memory_id}", params={"user": "ada"}))
    assert_not_found(globex.delete(f"/v1/memories/{memory_id}", params={"user": "ada"}))
    wiped = globex.request("DELETE", "/v1/memories", params={"user": "ada"})
    assert wiped.status_code == 200 and wiped.json()["deleted"] == 0
    usage = globex.get("/v1/memories/usage").json()
    assert usage["tenant"] == "globex" and usage["memories"] == 0

    # acme still has it
    mine = acme.get(f"/v1/memories/{memory_id}", params={"user": "ada"})
    assert mine.status_code == 200 and "llamas" in mine.json()["text"]
    assert acme.get("/v1/memories/usage").json()["memories"] >= 1
    assert acme.delete(f"/v1/memories/{memory_id}", params={"user": "ada"}).status_code == 200
