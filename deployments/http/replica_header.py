"""``x-m-ai-replica``: every HTTP answer names the ingress replica that made it (Serve's replica
id). Diagnostic only (docs/api.md): which replica served a request, to match logs, or to show a
chain of responses hopping replicas. Outside a Serve replica (the OpenAPI build) there is none."""

from __future__ import annotations

from typing import Any

REPLICA_HEADER = "x-m-ai-replica"


def replica_id() -> str | None:
    """This Serve replica's unique id; None outside a replica."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # RayServeException: not in a replica
        return None


class ReplicaHeader:
    """ASGI middleware adding the header to each response's start (streams included)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode("latin-1"), replica.encode("latin-1"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


__all__ = ["REPLICA_HEADER", "ReplicaHeader", "replica_id"]
