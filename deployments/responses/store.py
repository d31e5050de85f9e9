"""Where the Responses API keeps its state: in the session store, like any session.

- A chain of responses is one session. ``resp_<session token>.<n>`` names the response whose
  answer is the session's ``n``-th message, so ``previous_response_id`` needs no lookup
  table: any ingress replica reads the session (durable: write-ahead log and snapshots, on
  whichever store shard holds it), and a tenant only ever finds its own sessions.
- Continuing from the session's latest response appends to the same session. Continuing from
  an earlier one (a fork) copies the messages up to it into a new session first.
- Each stored response object (output items, usage, settings) is kept in the session's
  metadata under ``resp.<n>``; GET reads it, DELETE removes it (and the session with the
  last one, unless it is a conversation).
- A conversation (``conv_<session token>``) is a session too; responses with
  ``conversation`` append to it, ``/v1/conversations/{id}/items`` lists its messages.

The turns go through the ingress's session path, so memory absorbs them like any other.
Writers of one chain are expected one at a time (as a client continues a chain); two
replicas recording responses of the same session at the same instant may lose one record.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.errors import NotFoundError
from deployments.ingress.stores.sessions import SessionClient
from deployments.protocol import SessionCreateRequest

KIND = "m_ai.kind"  # metadata: "responses" or "conversation"
COPY_BATCH = 64  # messages per append when a fork copies history (max_messages_per_turn)


def response_id(session_id: str, count: int) -> str:
    return f"resp_{session_id.removeprefix('sess-')}.{count}"


def parse_response_id(value: str, param: str) -> tuple[str, int]:
    token, _, count = value.removeprefix("resp_").rpartition(".")
    if not value.startswith("resp_") or not token or not count.isdigit():
        raise NotFoundError(f"{param}={value!r}: no such response", param=param)
    return f"sess-{token}", int(count)


def conversation_id(session_id: str) -> str:
    return f"conv_{session_id.removeprefix('sess-')}"


def parse_conversation_id(value: str, param: str = "conversation") -> str:
    if not value.startswith("conv_") or len(value) < 10:
        raise NotFoundError(f"{param}={value!r}: no such conversation", param=param)
    return f"sess-{value.removeprefix('conv_')}"


class ResponseStore:
    """Responses and conversations over the ingress's ``SessionClient``."""

    def __init__(self, sessions: SessionClient) -> None:
        self.sessions = sessions

    async def create(
        self, tenant: str, kind: str, user: str | None, metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        request = SessionCreateRequest(metadata={**(metadata or {}), KIND: kind}, user=user)
        info = await self.sessions.create(tenant, request)
        return info.model_dump()

    async def load(self, session_id: str, tenant: str, param: str, what: str) -> dict[str, Any]:
        """The session's summary with messages and metadata (404 naming ``param``)."""
        try:
            return await self.sessions.details(session_id, tenant)
        except NotFoundError:
            raise NotFoundError(f"{param}: no such {what}", param=param) from None

    async def load_response(self, rid: str, tenant: str, param: str) -> tuple[dict[str, Any], int, dict]:
        """``(session, n, stored response)`` of response ``rid``."""
        sid, count = parse_response_id(rid, param)
        session = await self.load(sid, tenant, param, "response")
        stored = (session.get("metadata") or {}).get(f"resp.{count}")
        if stored is None:
            raise NotFoundError(f"{param}={rid!r}: no such response (deleted or never stored)", param=param)
        return session, count, json.loads(stored)

    async def append(self, session_id: str, tenant: str, messages: list[dict[str, str]]) -> int:
        count = 0
        for start in range(0, len(messages), COPY_BATCH):
            count = await self.sessions.append(session_id, tenant, messages[start : start + COPY_BATCH])
        return count

    async def fork(self, tenant: str, session: dict[str, Any], count: int) -> str:
        """A new session holding the first ``count`` messages of ``session``."""
        info = await self.create(tenant, "responses", session.get("user"))
        await self.append(info["id"], tenant, list(session.get("messages") or [])[:count])
        return info["id"]

    async def record(self, session_id: str, tenant: str, count: int, response: dict[str, Any]) -> None:
        await self._set(session_id, tenant, {f"resp.{count}": json.dumps(response)})

    async def update_metadata(self, session_id: str, tenant: str, metadata: dict[str, str]) -> None:
        await self._set(session_id, tenant, metadata)

    async def _set(self, session_id: str, tenant: str, values: dict[str, str | None]) -> None:
        session = await self.sessions.details(session_id, tenant)
        metadata = dict(session.get("metadata") or {})
        for key, value in values.items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        await self.sessions._call_for(session_id, "update", tenant, metadata=metadata)

    async def forget(self, rid: str, tenant: str) -> tuple[str, bool]:
        """Remove response ``rid``; ``(session id, whether the session holds no more)``."""
        session, count, _ = await self.load_response(rid, tenant, "response_id")
        sid = session["id"]
        metadata = dict(session.get("metadata") or {})
        metadata.pop(f"resp.{count}", None)
        await self._set(sid, tenant, {f"resp.{count}": None})
        left = any(k.startswith("resp.") for k in metadata)
        return sid, not left and metadata.get(KIND) != "conversation"


__all__ = [
    "ResponseStore",
    "response_id",
    "parse_response_id",
    "conversation_id",
    "parse_conversation_id",
    "KIND",
]
