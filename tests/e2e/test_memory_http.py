"""Conversation memory over HTTP, on the real engine (the tiny Llama 2 checkpoint): a fact told
in one session reaches a new session of the same user and no one else's; the /v1/memories API
(list, search, add, read, delete, usage) is scoped by tenant; a dead memory actor does not fail
a chat. What memory put in a prompt is read from the session's context preview
(``POST /v1/sessions/{id}/context``), and each preview is proved to be what the engine got:
the chat turn sent right after it counts the same ``usage.prompt_tokens``, which is the model's
chat template's count of the previewed messages."""

from __future__ import annotations

import httpx
import pytest

from cluster.config.serving import hash_api_key
from tests.support.serve_harness import app_config, wait_until

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
    deployed = serve_cluster.deploy(config, prefix="memory")  # the real engine
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The served model's tokenizer: the counts in ``usage`` are its counts."""
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def _client(app, key: str) -> httpx.Client:
    return httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def acme(app):
    with _client(app, KEY_ACME) as c:
        yield c


@pytest.fixture(scope="module")
def globex(app):
    with _client(app, KEY_GLOBEX) as c:
        yield c


def turn(content: str, user: str | None) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,  # the answer's text does not matter here: the prompt does
        "temperature": 0,
    }
    return body if user is None else {**body, "user": user}


def preview(http: httpx.Client, session_id: str, content: str, user: str | None = None) -> dict:
    """The session's context preview of this turn: the messages the model would get."""
    response = http.post(f"/v1/sessions/{session_id}/context", json=turn(content, user))
    assert response.status_code == 200, response.text
    return response.json()


def text_of(previewed: dict) -> str:
    return "\n".join(m["content"] for m in previewed["messages"])


def chat(http: httpx.Client, session_id: str, content: str, user: str | None = None) -> dict:
    response = http.post("/v1/chat/completions", json={**turn(content, user), "session_id": session_id})
    assert response.status_code == 200, response.text
    return response.json()


def previewed_chat(
    http: httpx.Client, tokenizer, session_id: str, content: str, user: str | None = None
) -> dict:
    """The turn's preview, then the turn itself: the engine got the previewed prompt, token
    for token in count (the preview generated and stored nothing in between)."""
    seen = preview(http, session_id, content, user)
    reply = chat(http, session_id, content, user)
    assert reply["usage"]["prompt_tokens"] == seen["prompt_tokens"], (seen, reply["usage"])
    assert seen["prompt_tokens"] == len(tokenizer.apply_chat_template(seen["messages"]))
    return seen


def new_session(http: httpx.Client) -> str:
    response = http.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def memories(http: httpx.Client, user: str, **params) -> dict:
    response = http.get("/v1/memories", params={"user": user, **params})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_fact_from_one_session_reaches_the_users_next_session(acme, tokenizer):
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
    seen = previewed_chat(acme, tokenizer, second, "Am I allergic to anything?", user="ada")
    assert seen["memory"] is True and seen["user"] == "ada"
    system = seen["messages"][0]
    assert system["role"] == "system"
    assert FACTS_HEADER in system["content"] and "allergic to peanuts" in system["content"]
    # session A's turn reaches session B as a memory (after the memory header, dated), never
    # as a message of session B: B's prompt is the memory block and its question, and B's own
    # history holds only its question (and the model's answer)
    assert system["content"].index("User: My name is Ada.") > system["content"].index(FACTS_HEADER)
    assert seen["messages"][1:] == [{"role": "user", "content": "Am I allergic to anything?"}]
    own = acme.get(f"/v1/sessions/{second}").json()["messages"]
    assert [m["content"] for m in own if m["role"] == "user"] == ["Am I allergic to anything?"]

    stranger = new_session(acme)
    other = text_of(previewed_chat(acme, tokenizer, stranger, "Am I allergic to anything?", user="bob"))
    assert "peanuts" not in other and FACTS_HEADER not in other

    # the next turn of the same session still comes from memory's window of that session
    follow = text_of(previewed_chat(acme, tokenizer, second, "And what is my name?", user="ada"))
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


def test_a_session_created_for_a_user_feeds_that_users_memory(acme, tokenizer):
    created = acme.post("/v1/sessions", json={"user": "yuri"})
    assert created.status_code == 201 and created.json()["user"] == "yuri"
    session = created.json()["id"]
    chat(acme, session, "My name is Yuri. I live in Kyiv.")  # the request names no user
    wait_until(lambda: memories(acme, "yuri")["total"] >= 1, timeout_s=30)
    assert memories(acme, f"session:{session}")["total"] == 0
    later = new_session(acme)
    assert "Kyiv" in text_of(previewed_chat(acme, tokenizer, later, "Where do I live?", user="yuri"))
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


def test_a_context_preview_stores_nothing_and_answers_only_its_tenant(acme, globex):
    session = new_session(acme)
    seen = preview(acme, session, "I live in Rome.", user="quinn")
    assert (seen["object"], seen["session_id"], seen["model"]) == ("session.context", session, MODEL)
    assert seen["messages"][-1] == {"role": "user", "content": "I live in Rome."}
    assert acme.get(f"/v1/sessions/{session}").json()["message_count"] == 0  # no turn stored
    # memory absorbs a session's turns in order: once the chat's fact is in, a preview's would be
    chat(acme, session, "My name is Quinn.", user="quinn")
    kept = wait_until(lambda: (found := memories(acme, "quinn"))["total"] >= 1 and found, timeout_s=30)
    assert not any("Rome" in m["text"] for m in kept["data"]), kept

    def refused(http: httpx.Client, path_id: str, **body) -> dict:
        response = http.post(f"/v1/sessions/{path_id}/context", json={**turn("hi", None), **body})
        assert response.status_code in (400, 404), response.text
        return {"status": response.status_code, "param": response.json()["error"]["param"]}

    assert refused(globex, session) == {"status": 404, "param": "session_id"}  # acme's session
    assert refused(acme, "sess-unknown") == {"status": 404, "param": "session_id"}
    assert refused(acme, session, model="llama-9000") == {"status": 404, "param": "model"}
    assert refused(acme, session, session_id="sess-other")["status"] == 400  # the path names it
    assert refused(acme, session, messages=[])["status"] == 400
    assert refused(acme, session, colour="red")["status"] == 400
    assert httpx.post(f"{acme.base_url}v1/sessions/{session}/context", json=turn("hi", None)).status_code == 401


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
    # answered from the session (sliding window) or from a memory shard Serve recreated
    seen = preview(acme, session, "Where do I live?", user="erin")
    assert seen["messages"][-1] == {"role": "user", "content": "Where do I live?"}
    assert chat(acme, session, "Where do I live?", user="erin")["choices"][0]["message"]["role"] == "assistant"
