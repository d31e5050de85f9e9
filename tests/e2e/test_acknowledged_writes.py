"""An acknowledged memory write survives the death of its memory shard right after the 200:
``POST /v1/memories`` answers, the shard process is killed at once (long before the shard's
periodic write), and the memory is there when Serve has recreated the shard; a delete
acknowledged the same way stays deleted."""

from __future__ import annotations

import httpx
import pytest

from tests.support.serve_harness import app_config, wait_until

USER = "dora"


@pytest.fixture(scope="module")
def app(serve_cluster):
    # An hour between whole-file writes: only the journal can keep what is acknowledged.
    config = app_config(memory={"persist_interval_s": 3600.0})
    deployed = serve_cluster.deploy(config, prefix="ackw")  # the real engine
    yield deployed
    deployed.delete()


def kill_memory_shard(app) -> None:
    import ray

    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_DEPLOYMENT_ACTOR::{app.name}::")
        and a["name"].endswith("::memory-0")
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_an_acknowledged_memory_and_delete_survive_a_shard_killed_right_after(app):
    with httpx.Client(base_url=app.url, timeout=30) as http:
        kept = http.post("/v1/memories", json={"user": USER, "text": "The user plays the oboe."})
        dropped = http.post("/v1/memories", json={"user": USER, "text": "The user owns a yacht."})
        assert kept.status_code == dropped.status_code == 200, (kept.text, dropped.text)
        gone = dropped.json()["memory"]["id"]
        assert http.delete(f"/v1/memories/{gone}", params={"user": USER}).status_code == 200
        kill_memory_shard(app)  # right after the answers

        memory_id = kept.json()["memory"]["id"]
        wait_until(
            lambda: http.get(f"/v1/memories/{memory_id}", params={"user": USER}).status_code != 503,
            timeout_s=60, interval_s=0.5, what="a memory shard back",
        )
        found = http.get(f"/v1/memories/{memory_id}", params={"user": USER})
        assert found.status_code == 200, found.text
        assert found.json()["text"] == "The user plays the oboe."
        assert http.get(f"/v1/memories/{gone}", params={"user": USER}).status_code == 404
