"""Session affinity in a real Serve deployment: the router of ``serving.session_affinity``."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from cluster.config import ModelConfig
from cluster.config.serving import ServingConfig
from deployments.app import SESSION_ROUTER, llm_deployment_options


def test_the_model_deployment_uses_the_session_router_unless_turned_off():
    on = llm_deployment_options(ModelConfig(), ServingConfig())
    assert on["request_router_config"] == {"request_router_class": SESSION_ROUTER}
    off = llm_deployment_options(ModelConfig(), ServingConfig(session_affinity=False))
    assert "request_router_config" not in off


@pytest.fixture(scope="module")
def echo(serve_cluster):
    """Three replicas that answer with their replica id, routed by the session router."""
    from ray import serve

    @serve.deployment(
        num_replicas=3,
        ray_actor_options={"num_cpus": 0},
        request_router_config={"request_router_class": SESSION_ROUTER},
    )
    class Echo:
        def who(self) -> str:
            return serve.get_replica_context().replica_id.unique_id

    handle = serve.run(Echo.bind(), name="routing-echo", route_prefix="/routing-echo")
    yield handle
    serve.delete("routing-echo")


def test_a_sessions_requests_reach_one_replica_and_sessions_spread(echo):
    served: dict[str, set[str]] = defaultdict(set)
    for _turn in range(5):
        for i in range(12):
            served[f"sess-{i}"].add(echo.options(session_id=f"sess-{i}").who.remote().result())
    assert all(len(replicas) == 1 for replicas in served.values()), served
    homes = Counter(next(iter(r)) for r in served.values())
    assert len(homes) >= 2, homes  # 12 sessions on 3 replicas: not all on one


def test_requests_without_a_session_use_every_replica(echo):
    seen = {echo.who.remote().result() for _ in range(40)}
    assert len(seen) == 3, seen
