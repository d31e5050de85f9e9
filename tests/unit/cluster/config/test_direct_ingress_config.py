"""``serving.direct_ingress``: what it refuses, and the cluster-wide Serve settings it makes."""

from __future__ import annotations

import pytest

from cluster.config import build_app_config
from cluster.config.serving import SERVE_CLUSTER_ENV, ServingConfig, serve_cluster_env
from cluster.errors import ConfigError


def test_off_by_default_the_cluster_gets_only_the_proxy_settings():
    serving = ServingConfig()
    assert serving.direct_ingress is False
    assert serve_cluster_env(serving) == SERVE_CLUSTER_ENV
    assert not any("DIRECT_INGRESS" in key for key in serve_cluster_env(serving))


def test_on_pins_the_ingress_port_to_the_configured_one_without_hold_backs():
    env = serve_cluster_env(ServingConfig(port=8123, direct_ingress=True))
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates ports from range(MIN, MAX): exactly 8123
    low, high = env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]
    assert list(range(int(low), int(high))) == [8123]
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert env["RAY_SERVE_PROXY_USE_GRPC"] == "1"


@pytest.mark.parametrize(
    "serving, words",
    [
        (
            {"direct_ingress": True, "ingress_replicas": 2},
            ["ingress_replicas=2", "direct_ingress=true", "port 8000", "ingress_replicas: 1"],
        ),
        ({"direct_ingress": True, "port": 65535}, ["port=65535", "lower port"]),
        ({"direct_ingress": "sometimes"}, ["direct_ingress", "sometimes"]),
    ],
)
def test_bad_combinations_name_the_field_the_value_and_the_fix(serving, words):
    with pytest.raises(ConfigError) as err:
        build_app_config({"serving": serving}, "test config")
    for word in words:
        assert word in str(err.value), str(err.value)


def test_two_ingress_replicas_behind_the_proxy_stay_allowed():
    assert ServingConfig(ingress_replicas=2).ingress_replicas == 2

