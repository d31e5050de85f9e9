"""Server-side conversations: the turns of each session, kept per tenant.

A plain class (Ray makes it an actor where the application is built; one per shard, picked by
``shard_for(session_id, shards)``). Messages are plain dicts ``{"role", "content"}`` so that
this layer needs nothing from the HTTP models. A session is visible only to its tenant: asking
for another tenant's session reads as not found. Here the store lives in memory and forgets
the least recently used sessions beyond ``max_sessions``; durability comes later behind the
same interface.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import InvalidRequestError, NotFoundError

ROLES = ("system", "user", "assistant")


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex}"


def shard_for(session_id: str, shards: int) -> int:
    """The store shard that holds ``session_id`` (stable across processes and restarts)."""
    return zlib.crc32(session_id.encode("utf-8")) % shards


@dataclass
class _Session:
    id: str
    tenant: str
    created: int
    system_prompt: str | None
    metadata: dict[str, str]
    messages: list[dict[str, str]] = field(default_factory=list)
    updated: float = field(default_factory=time.time)

    def summary(self, with_messages: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "created": self.created,
            "system_prompt": self.system_prompt,
            "metadata": dict(self.metadata),
            "turns": len(self.messages),
        }
        if with_messages:
            out["messages"] = [dict(m) for m in self.messages]
        return out


class SessionStore:
    """The sessions of one shard (see the module docstring)."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def create(
        self,
        tenant: str,
        session_id: str | None = None,
        system_prompt: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Start a session (a new id unless given); returns its summary."""
        sid = session_id or new_session_id()
        if sid in self._sessions:
            raise InvalidRequestError(
                f"session_id={sid!r} already exists; omit it to get a new id", param="session_id"
            )
        session = _Session(sid, tenant, int(time.time()), system_prompt, dict(metadata or {}))
        self._sessions[sid] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session.summary(with_messages=False)

    def get(self, session_id: str, tenant: str) -> dict[str, Any]:
        """The session with its messages."""
        return self._find(session_id, tenant).summary(with_messages=True)

    def context(self, session_id: str, tenant: str) -> list[dict[str, str]]:
        """What a new turn is appended to: the system prompt (if any) then every turn so far."""
        session = self._find(session_id, tenant)
        head = (
            [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        )
        return head + [dict(m) for m in session.messages]

    def append(self, session_id: str, tenant: str, messages: list[dict[str, str]]) -> int:
        """Add turns at the end; returns how many the session holds."""
        session = self._find(session_id, tenant)
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidRequestError(
                    f"a session message needs a role in {ROLES} and text content", param="messages"
                )
        session.messages.extend({"role": m["role"], "content": m["content"]} for m in messages)
        session.updated = time.time()
        return len(session.messages)

    def list_sessions(self, tenant: str) -> list[dict[str, Any]]:
        return [
            s.summary(with_messages=False) for s in self._sessions.values() if s.tenant == tenant
        ]

    def delete(self, session_id: str, tenant: str) -> bool:
        self._find(session_id, tenant)
        del self._sessions[session_id]
        return True

    def __len__(self) -> int:
        return len(self._sessions)

    def _find(self, session_id: str, tenant: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFoundError(
                f"session_id={session_id!r} does not exist (or belongs to another tenant)",
                param="session_id",
            )
        self._sessions.move_to_end(session_id)
        return session


__all__ = ["SessionStore", "shard_for", "new_session_id"]
