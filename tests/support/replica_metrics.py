"""Per-replica figures of a running app, read from its ``GET /metrics`` (the chaos benchmark
and the migration tests find the replica that serves a stream, and wait until the ingress's
router knows both replicas)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx


def per_replica(url: str, model: str, series: str = "vllm:num_requests_running") -> dict[str, float]:
    """A series of ``GET /metrics`` per model replica (replica id -> value; running requests)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {replica: float(value) for replica, value in re.findall(
        rf'^{series}{{model_name="{model}",replica="([^"]+)"}} (\S+)$', text, re.M)}


def routed_to_both(url: str, model: str, short_request: dict[str, Any]) -> bool:
    """Whether six concurrent ``short_request``s reach both replicas: the ingress's router knows
    both (it learns of a restarted replica a while after that replica reports in /metrics)."""
    before = per_replica(url, model, "vllm:generation_tokens_total")

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(client.post("/v1/chat/completions", json=short_request) for _ in range(6)))

    asyncio.run(burst())
    after = per_replica(url, model, "vllm:generation_tokens_total")
    return len(after) == 2 and all(after[r] > before.get(r, 0.0) for r in after)
