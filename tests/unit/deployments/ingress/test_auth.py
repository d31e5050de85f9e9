"""API keys: only their sha256 digests are configured and held, a presented key is compared
with every digest in constant time (hmac.compare_digest, no early exit), and every way of
presenting a wrong key is the same 401."""

from __future__ import annotations

import hmac

import pytest

from cluster.config.serving import ServingConfig, hash_api_key
from cluster.errors import AuthenticationError
from deployments.ingress.auth import DEFAULT_TENANT, ApiKeyAuth

KEYS = {"acme": "sk-unit-acme-aaaaaaaaaaaa", "globex": "sk-unit-globex-bbbbbbbbbb", "initech": "sk-unit-initech-ccccccccc"}


@pytest.fixture
def auth() -> ApiKeyAuth:
    return ApiKeyAuth(ServingConfig(api_keys={hash_api_key(k): t for t, k in KEYS.items()}))


def test_the_config_and_the_checker_hold_digests_never_keys(auth):
    serving = ServingConfig(api_keys={hash_api_key(k): t for t, k in KEYS.items()})
    dumped = serving.model_dump_json() + repr(vars(auth))
    assert not any(key in dumped for key in KEYS.values())
    assert all(hash_api_key(key) in dumped for key in KEYS.values())
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        ServingConfig(api_keys={"sk-plain-text-key": "acme"})


def test_each_key_resolves_its_tenant(auth):
    for tenant, key in KEYS.items():
        assert auth.tenant(f"Bearer {key}") == tenant
        assert auth.tenant(f"bearer   {key}  ") == tenant


def test_every_digest_is_compared_in_constant_time(auth, monkeypatch):
    calls = []
    compare = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("deployments.ingress.auth.hmac.compare_digest", counting)
    auth.tenant(f"Bearer {KEYS['acme']}")  # the first configured key: no early exit either
    assert len(calls) == len(KEYS)
    calls.clear()
    with pytest.raises(AuthenticationError):
        auth.tenant("Bearer sk-wrong")
    assert len(calls) == len(KEYS)
    assert all(b == hash_api_key("sk-wrong") for _, b in calls)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic abc", f"Token {KEYS['acme']}", "Bearer sk-wrong",
     f"Bearer {KEYS['acme']}x", f"Bearer {KEYS['acme'][:-1]}"],
)
def test_a_missing_or_wrong_key_is_a_401(auth, header):
    with pytest.raises(AuthenticationError) as info:
        auth.tenant(header)
    assert info.value.status_code == 401 and info.value.param == "authorization"
    assert KEYS["acme"] not in info.value.message  # the message never echoes a key


def test_without_keys_everyone_is_the_default_tenant():
    auth = ApiKeyAuth(ServingConfig())
    assert not auth.enabled
    assert auth.tenant(None) == DEFAULT_TENANT == auth.tenant("Bearer anything")
