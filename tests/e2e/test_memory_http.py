"""Conversation memory over HTTP, with the echo fake engine (its reply is the prompt it was
given, so the reply shows what memory put in the prompt): a fact told in one session reaches
a new session of the same user and no one else's; the /v1/memories API (list, search, add,
read, delete, usage) is scoped by tenant; a dead memory actor does not fail a chat."""

from __future__ import annotations

import httpx
import pytest

from cluster.config.serving import hash_api_key
from tests.support.serve_harness import FAKE_ENGINE, app_config, wait_until

MODEL = "m-ai-tiny"
KEY_ACME = "sk-test-acme-mem-0123456789"
KEY_GLOBEX = "sk-test-globex-mem-9876543210"
FACTS_HEADER = "Facts about the user from earlier conversations:"


@pytest.fixture(scope="module")
def app(serve_cluster):
    config = app_config(
        api_keys={hash_api_key(KEY_ACME): "acme", hash_api_key(KEY_GLOBEX): "globex"},
        memory={"persist_interval_s": 0.2},
    )
    # The fake engine: its echo is the only way to see over HTTP what memory put in the prompt
    # (the real engine's reply cannot show it).
    deployed = serve_cluster.deploy(
        config,
        prefix="memory",
        engine_cls=FAKE_ENGINE,
        engine_options={"reply": "echo", "tokens_per_s": 4000},
    )
    yield deployed
    deployed.delete()


def _client(app, key: str) -> httpx.Client:
    return httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def acme(app):
    with _client(app, KEY_ACME) as c:
        yield c


@pytest.fixture(scope="module")
def globex(app):
    with _client(app, KEY_GLOBEX) as c:
        yield c


def chat(http: httpx.Client, session_id: str, content: str, user: str | None = None) -> str:
    body = {
        "model": MODEL,
        "session_id": session_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 1000,  # the echo is the whole prompt: the memory block, then the window
        "temperature": 0,
    }
    if user is not None:
        body["user"] = user
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def new_session(http: httpx.Client) -> str:
    response = http.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def memories(http: httpx.Client, user: str, **params) -> dict:
    response = http.get("/v1/memories", params={"user": user, **params})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_fact_from_one_session_reaches_the_users_next_session(acme):
    first = new_session(acme)
    chat(acme, first, "My name is Ada. I am allergic to peanuts.", user="ada")
    listed = wait_until(
        lambda: (found := memories(acme, "ada"))["total"] >= 2 and found,
        timeout_s=20, what="the facts of session A extracted",
    )
    texts = {m["text"] for m in listed["data"]}
    assert "The user is allergic to peanuts." in texts and "The user's name is Ada." in texts
    assert all(m["source_turns"] == [f"{first}#2"] for m in listed["data"])

    second = new_session(acme)
    reply = chat(acme, second, "Am I allergic to anything?", user="ada")
    assert FACTS_HEADER in reply and "allergic to peanuts" in reply
    # session A's turn reaches session B as a memory (after the memory header, dated), never
    # as a message of session B: B's own history holds only its question (and the echo's answer)
    assert reply.index("User: My name is Ada.") > reply.index(FACTS_HEADER)
    own = acme.get(f"/v1/sessions/{second}").json()["messages"]
    assert [m["content"] for m in own if m["role"] == "user"] == ["Am I allergic to anything?"]

    stranger = new_session(acme)
    other = chat(acme, stranger, "Am I allergic to anything?", user="bob")
    assert "peanuts" not in other and FACTS_HEADER not in other

    # the next turn of the same session still comes from memory's window of that session
    follow = chat(acme, second, "And what is my name?", user="ada")
    assert "Am I allergic to anything?" in follow and "The user's name is Ada." in follow


def test_add_supersede_list_search_get_delete(acme):
    user = "carol"
    added = acme.post("/v1/memories", json={
        "user": user, "text": "The user lives in Oslo.", "slot": "location", "value": "Oslo",
    })
    assert added.status_code == 200, added.text
    assert added.json()["decision"]["action"] == "add"
    oslo = added.json()["memory"]["id"]
    moved = acme.post("/v1/memories", json={
        "user": user, "text": "The user lives in Bergen.", "slot": "location", "value": "Bergen",
    }).json()
    assert moved["decision"]["action"] == "supersede" and moved["decision"]["targets"] == [oslo]
    bergen = moved["memory"]["id"]

    assert [m["id"] for m in memories(acme, user)["data"]] == [bergen]
    history = memories(acme, user, include_history="true")
    assert history["total"] == 2 and {m["status"] for m in history["data"]} == {"active", "superseded"}

    found = acme.post("/v1/memories/search", json={"user": user, "query": "Where do I live?"})
    assert found.status_code == 200 and found.json()["data"][0]["id"] == bergen
    assert found.json()["data"][0]["similarity"] > 0

    assert acme.get(f"/v1/memories/{bergen}", params={"user": user}).json()["text"] == (
        "The user lives in Bergen."
    )
    usage = acme.get("/v1/memories/usage").json()
    assert usage["tenant"] == "acme" and usage["memories"] >= 1 and usage["bytes"] > 0

    gone = acme.delete(f"/v1/memories/{bergen}", params={"user": user})
    assert gone.status_code == 200 and gone.json() == {"id": bergen, "object": "memory", "deleted": True}
    missing = acme.get(f"/v1/memories/{bergen}", params={"user": user})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "memory_id"

    acme.post("/v1/memories", json={"user": user, "text": "The user likes tea.", "kind": "preference"})
    wiped = acme.delete("/v1/memories", params={"user": user}).json()
    assert wiped["object"] == "memory.deleted_all" and wiped["deleted"] >= 1
    assert memories(acme, user)["total"] == 0


def test_tenants_never_see_each_others_memories(acme, globex):
    mine = acme.post("/v1/memories", json={"user": "dave", "text": "The user has a cat named Tom."})
    memory_id = mine.json()["memory"]["id"]
    assert globex.get(f"/v1/memories/{memory_id}", params={"user": "dave"}).status_code == 404
    assert globex.delete(f"/v1/memories/{memory_id}", params={"user": "dave"}).status_code == 404
    assert memories(globex, "dave")["total"] == 0
    searched = globex.post("/v1/memories/search", json={"user": "dave", "query": "cat"})
    assert searched.json()["data"] == []
    assert acme.get(f"/v1/memories/{memory_id}", params={"user": "dave"}).status_code == 200


def test_bad_memory_requests_are_400(acme):
    extra = acme.post("/v1/memories", json={"user": "x", "text": "t", "colour": "red"})
    assert extra.status_code == 400 and "colour" in extra.text
    assert acme.post("/v1/memories", json={"user": "x", "text": "t", "kind": "mood"}).status_code == 400
    assert acme.get("/v1/memories").status_code == 400  # no user
    assert acme.get("/v1/memories", params={"user": "x", "limit": 0}).status_code == 400
    assert httpx.get(f"{acme.base_url}v1/memories", params={"user": "x"}).status_code == 401


def test_a_session_created_for_a_user_feeds_that_users_memory(acme):
    created = acme.post("/v1/sessions", json={"user": "yuri"})
    assert created.status_code == 201 and created.json()["user"] == "yuri"
    session = created.json()["id"]
    chat(acme, session, "My name is Yuri. I live in Kyiv.")  # the request names no user
    wait_until(lambda: memories(acme, "yuri")["total"] >= 1, timeout_s=30)
    assert memories(acme, f"session:{session}")["total"] == 0
    later = new_session(acme)
    assert "Kyiv" in chat(acme, later, "Where do I live?", user="yuri")
    assert acme.post("/v1/sessions", json={"user": ""}).status_code == 400


def test_deleting_a_session_deletes_what_memory_kept_of_it(acme, globex):
    session = new_session(globex)
    chat(globex, session, "My name is Zoe. I live in Lima.")  # no user: session-scoped memory
    scoped = f"session:{session}"
    wait_until(lambda: memories(globex, scoped)["total"] >= 1, timeout_s=30)
    other = new_session(acme)
    response = acme.delete(f"/v1/sessions/{session}")  # another tenant's session: not found
    assert response.status_code == 404 and memories(globex, scoped)["total"] >= 1
    assert acme.delete(f"/v1/sessions/{other}").status_code == 200

    assert globex.delete(f"/v1/sessions/{session}").status_code == 200
    assert memories(globex, scoped)["total"] == 0
    assert globex.get(f"/v1/sessions/{session}").status_code == 404
    assert globex.get("/v1/memories/usage").json()["users"] == 0


def test_chat_answers_when_the_memory_actor_is_dead(app, acme):
    """Runs last: it kills the module's memory shard."""
    import ray

    session = new_session(acme)
    chat(acme, session, "I live in Paris.", user="erin")
    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_DEPLOYMENT_ACTOR::{app.name}::")
        and a["name"].endswith("::memory-0")
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    reply = chat(acme, session, "Where do I live?", user="erin")
    # answered from the session (sliding window) or from a memory shard Serve recreated
    assert "Where do I live?" in reply
