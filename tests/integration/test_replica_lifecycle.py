"""A model replica's life in Serve: its rank actors in a STRICT_PACK placement group, a dead
rank failing the health check until Serve replaces the replica, and live configuration."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import ray

from cluster.errors import EngineDeadError
from deployments.protocol import ChatCompletionRequest
from engine.fake_engine import DEFAULT_REPLY
from tests.support.serve_harness import (
    FAKE_ENGINE,
    FAST_FAKE,
    FAST_SERVING,
    app_config,
    wait_until,
)

MODEL = "m-ai-tiny"


def greedy_default_text(app) -> str:
    """The answer with the model's default temperature (the request sets none)."""
    request = ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40
    )
    return app.handle.chat.remote(request).result().choices[0].message.content


@pytest.fixture(scope="module")
def tp2_app(serve_cluster):
    config = app_config(models=[{"tp_size": 2}], health_check_period_s=3.0)
    # The placement group and rank actors of TP=2 without loading weights: the fake engine.
    deployed = serve_cluster.deploy(
        config, prefix="tp2", engine_cls=FAKE_ENGINE, engine_options=FAST_FAKE
    )
    yield deployed
    deployed.delete()


def test_ranks_run_in_the_replicas_strict_pack_placement_group(tp2_app):
    info = tp2_app.llm().describe.remote().result()

    pg = info["placement_group"]
    assert pg["strategy"] == "STRICT_PACK"
    # bundle 0 for the replica itself, one bundle per tensor-parallel rank
    assert pg["bundles"] == [{"CPU": 0.1}, {"CPU": 0.25}, {"CPU": 0.25}]
    assert [s["rank"] for s in info["ranks"]] == [0, 1]
    assert all(s["loaded"] for s in info["ranks"])
    assert {s["placement_group_id"] for s in info["ranks"]} == {pg["id"]}
    assert len({s["pid"] for s in info["ranks"]}) == 2
    assert len({s["node_id"] for s in info["ranks"]}) == 1


def test_a_dead_rank_fails_health_until_serve_replaces_the_replica(tp2_app):
    llm = tp2_app.llm()
    before = llm.describe.remote().result()
    assert tp2_app.handle.health.remote().result()["status"] == "ok"

    ray.kill(
        ray.get_actor(before["rank_names"][1], namespace=before["namespace"]), no_restart=True
    )

    # The replica's own check sees it at once (it rebuilds its ranks in place, or Serve
    # replaces it; tests/e2e/test_rank_supervision.py times both), and the app's health is 503
    # until the replica serves with new ranks.
    with pytest.raises(EngineDeadError):
        llm.health.remote().result()
    wait_until(
        lambda: _raises(tp2_app.handle.health.remote().result, EngineDeadError),
        timeout_s=15,
        interval_s=0.1,
        what="app health reports the dead replica",
    )

    def replaced() -> bool:
        return (
            tp2_app.handle.health.remote().result()["status"] == "ok"
            and llm.describe.remote().result()["rank_names"] != before["rank_names"]
        )

    wait_until(replaced, timeout_s=90, interval_s=0.5, what="the replica serving with new ranks")
    assert greedy_default_text(tp2_app)


def _raises(call, error: type[BaseException]) -> bool:
    try:
        call()
    except error:
        return True
    return False


def test_live_config_changes_sampling_defaults_and_refuses_a_reload(serve_cluster, tp2_app):
    # Deployed as `serve deploy` does it (app_builder + per-deployment user_config), next to
    # an application deployed with serve.run (tp2_app), which must keep running.
    name = f"live-{uuid.uuid4().hex[:6]}"
    args = {
        "config": {"serving": FAST_SERVING},
        "engine_cls": FAKE_ENGINE,
        "engine_options": FAST_FAKE,
    }

    def deploy(live: dict | None):
        overrides = [{"name": "llm-m-ai-tiny", "user_config": live}] if live is not None else []
        return serve_cluster.deploy_config(name, args, overrides)

    app = deploy(None)
    try:
        # The default temperature (0.7) samples: the fake engine shuffles its reply's words.
        assert greedy_default_text(app) != DEFAULT_REPLY[:40]
        llm = app.llm()
        replica = llm.describe.remote().result()["rank_names"]

        deploy({"model": {"temperature": 0.0}, "stream_interval_ms": 5})
        wait_until(
            lambda: llm.live_config.remote().result()["model"]["temperature"] == 0.0,
            timeout_s=30,
            what="live update applied",
        )
        assert greedy_default_text(app) == DEFAULT_REPLY[:40]
        live = llm.live_config.remote().result()
        assert live["stream_interval_ms"] == 5 and live["refused"] is None
        assert llm.describe.remote().result()["rank_names"] == replica  # same replica, no restart

        deploy({"model": {"temperature": 0.0, "tp_size": 2}})
        live = wait_until(
            lambda: (lc := llm.live_config.remote().result())["refused"] and lc,
            timeout_s=30,
            what="live update refused",
        )
        assert "tp_size" in live["refused"] and "reloaded" in live["refused"]
        assert live["model"]["temperature"] == 0.0  # the previous configuration stays
        assert greedy_default_text(app) == DEFAULT_REPLY[:40]
        assert llm.health.remote().result()["live_config_refused"] == live["refused"]
        assert llm.describe.remote().result()["rank_names"] == replica
        assert tp2_app.handle.health.remote().result()["status"] == "ok"
        # An operator sees it in the application's health (GET /health: 200, "degraded")...
        report = app.handle.health.remote().result()
        assert report["status"] == "degraded", report
        assert "tp_size 1 -> 2" in report["models"]["m-ai-tiny"]["live_config_refused"]
        assert "redeploy" in report["models"]["m-ai-tiny"]["live_config_refused"]
        # ...and in the replica's log, with the field and the reason.
        logs = Path(serve_cluster.temp_dir, "session_latest", "logs")
        lines = [
            line
            for f in logs.rglob("*.log")
            for line in f.read_text(errors="replace").splitlines()
            if "live configuration refused" in line
        ]
        assert any("tp_size 1 -> 2" in line and "redeploy" in line for line in lines), lines[-3:]

        deploy({"model": {"temperature": 0.0}})  # an update that applies clears the report
        wait_until(
            lambda: app.handle.health.remote().result()["status"] == "ok",
            timeout_s=30,
            what="health ok again after a live update that applies",
        )
    finally:
        app.delete()
