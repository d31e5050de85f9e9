"""The response cache: what is deterministic, tenant scoping, bounds and expiry."""

from __future__ import annotations

from cluster.response_cache import ResponseCache, ResponseCacheConfig, cache_key, is_deterministic

REQ = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_reproducible_requests_are_cached():
    assert is_deterministic(REQ)
    assert is_deterministic({**REQ, "temperature": 0.7, "seed": 3})
    assert not is_deterministic({**REQ, "temperature": 0.7})
    assert not is_deterministic({**REQ, "temperature": None})  # the model's default may sample
    assert not is_deterministic({**REQ, "session_id": "s1"})
    assert not is_deterministic({**REQ, "n": 2})


def test_key_ignores_transport_fields_but_not_the_prompt():
    assert cache_key("t", REQ) == cache_key("t", {**REQ, "stream": True, "user": "u"})
    assert cache_key("t", REQ) != cache_key("t", {**REQ, "max_tokens": 5})
    assert cache_key("a", REQ) != cache_key("b", REQ)


def test_hits_misses_and_tenant_isolation():
    cache = ResponseCache(ResponseCacheConfig(max_entries=8))
    assert cache.get("a", REQ) is None
    cache.put("a", REQ, "answer")
    assert cache.get("a", REQ) == "answer"
    assert cache.get("b", REQ) is None  # another tenant never sees it
    assert (cache.stats.hits, cache.stats.misses) == (1, 2)
    assert abs(cache.stats.hit_rate - 1 / 3) < 1e-9


def test_bounds_lru_per_tenant_and_ttl():
    clock = Clock()
    cache = ResponseCache(ResponseCacheConfig(max_entries=4, max_entries_per_tenant=2, ttl_s=10), clock)
    reqs = [{**REQ, "max_tokens": i} for i in range(5)]
    for r in reqs[:3]:
        cache.put("a", r, r["max_tokens"])
    assert len(cache) == 2 and cache.get("a", reqs[0]) is None  # per-tenant bound evicts a's oldest
    cache.put("b", reqs[0], "b0")
    cache.put("b", reqs[1], "b1")
    cache.get("a", reqs[1])  # refresh a's entry: b's and a's others go first
    cache.put("c", reqs[0], "c0")
    assert len(cache) == 4 and cache.get("a", reqs[1]) == 1 and cache.get("a", reqs[2]) is None
    clock.now = 11
    assert cache.get("a", reqs[1]) is None and len(cache) == 3  # expired entries are dropped
    cache.clear("b")
    assert len(cache) == 1


def test_disabled_cache_stores_nothing():
    cache = ResponseCache(ResponseCacheConfig())
    cache.put("a", REQ, "x")
    assert not cache.enabled and len(cache) == 0
