"""``build_app`` with ``serving.direct_ingress`` on a cluster whose Serve lacks it."""

from __future__ import annotations

import pytest

from cluster.config import build_app_config
from cluster.errors import ConfigError
from deployments.app import build_app


def test_an_app_asking_for_it_on_a_cluster_without_it_is_refused_with_the_fix(monkeypatch):
    config = build_app_config({"serving": {"direct_ingress": True}}, "test config")
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    with pytest.raises(ConfigError) as err:
        build_app(config)
    assert err.value.param == "serving.direct_ingress"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in err.value.message
    assert "m-ai serve" in err.value.message and "direct_ingress: false" in err.value.message
