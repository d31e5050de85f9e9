"""The ingress's half of the conversation memory: a part the ``Ingress`` holds (``ingress.memory``).

Request path, for a chat request with a ``session_id`` (docs/memory.md, "Over HTTP"):

1. ``session_context`` reads the session (messages, system prompt, user) and asks the user's
   memory shard for a ``MemoryRecall`` (ranked facts, summaries, the recent turns). The
   LLMServer then assembles the prompt from it (``actors.memory.recall.context``). Without memory
   (``memory.enabled: false``) or when its shard cannot answer, the session's messages are put
   in front of the request and the LLMServer's sliding window fits them, as before.
2. ``remember_turn`` hands the finished turn to memory in the background, after the session
   append; the reply never waits for it.

And the memory API (``/v1/memories``, also a handle API): list, search, add, read, delete a
user's memories and the tenant's usage, all scoped by the caller's tenant.
"""

from __future__ import annotations

from typing import Any

from cluster.errors import NotFoundError
from deployments.ingress.observability import IngressObservability
from deployments.ingress.stores.memory_client import MemoryClient, memory_user
from deployments.ingress.stores.sessions import SessionClient
from deployments.messages import SessionContext
from deployments.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    MemoryCreateRequest,
    MemorySearchRequest,
    MemoryTurnRequest,
)


def _last_user_text(request: ChatCompletionRequest) -> str | None:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text()
    return None


class IngressMemory:
    """Session context and the memory API for the ingress. ``client`` is None when memory
    is off (``memory.enabled: false``): sessions then feed the sliding window alone."""

    def __init__(
        self, sessions: SessionClient, observe: IngressObservability, client: MemoryClient | None
    ) -> None:
        self.sessions = sessions
        self.observe = observe
        self.client = client

    @property
    def enabled(self) -> bool:
        return self.client is not None

    async def session_context(
        self, request: ChatCompletionRequest, tenant: str, whole: bool = False, touch: bool = True
    ) -> SessionContext:
        """The request with its session's context: a memory recall, or the earlier turns.
        ``whole``: every earlier turn, none to be dropped and no recall (the Responses API's
        ``truncation="disabled"``: too long a history is the request's 400). ``touch`` False:
        the facts recalled do not count as used (a preview of the prompt)."""
        if not request.session_id:
            return SessionContext(request, 0)
        if whole:
            return await self._whole_session(request, tenant)
        sid = request.session_id
        with self.observe.timed("memory_retrieval", request.model):
            with self.observe.session_op("context"):
                if self.client is None:
                    history = await self.sessions.context(sid, tenant)
                    session: dict[str, Any] = {}
                else:
                    session = await self.sessions.details(sid, tenant)
            if self.client is not None:
                system_prompt = session.get("system_prompt")
                # the model reads each message's text (tool items rendered as the model wrote them)
                messages = [{"role": m["role"], "content": m["content"]} for m in session.get("messages") or []]
                user = memory_user(request.user, session.get("user"), sid)
                recall = await self.client.recall(
                    tenant, user, sid, _last_user_text(request), messages, touch=touch
                )
                if recall is not None:
                    plain = request.model_copy(update={"session_id": None})
                    return SessionContext(plain, 0, user, recall, system_prompt)
                head = [{"role": "system", "content": system_prompt}] if system_prompt else []
                history = head + list(messages)
        full = [ChatMessage.model_validate(m) for m in history] + list(request.messages)
        update = {"messages": full, "session_id": None}
        return SessionContext(
            request.model_copy(update=update), len(history), user if self.client else None
        )

    async def _whole_session(self, request: ChatCompletionRequest, tenant: str) -> SessionContext:
        sid = request.session_id
        with self.observe.timed("memory_retrieval", request.model):
            with self.observe.session_op("context"):
                session = await self.sessions.details(sid, tenant)
        system_prompt = session.get("system_prompt")
        head = [ChatMessage(role="system", content=system_prompt)] if system_prompt else []
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in session.get("messages") or []]
        # the request's own system messages (instructions) lead, then the history, then the turn
        lead = 0
        while lead < len(request.messages) and request.messages[lead].role in ("system", "developer"):
            lead += 1
        full = head + list(request.messages[:lead]) + history + list(request.messages[lead:])
        user = memory_user(request.user, session.get("user"), sid) if self.client else None
        plain = request.model_copy(update={"messages": full, "session_id": None})
        return SessionContext(plain, 0, user)

    def remember_turn(
        self, context: SessionContext, tenant: str, session_id: str, turn_id: int, turn: list[dict[str, str]]
    ) -> None:
        """Memory absorbs the stored turn in the background (``turn_id``: the session's
        message count after the append)."""
        if self.client is not None and context.user is not None:
            self.client.absorb(tenant, context.user, session_id, turn_id, turn)

    # -- the memory API (the Ingress's handle methods and /v1/memories call these) ----------

    def _memory_client(self) -> MemoryClient:
        if self.client is None:
            raise NotFoundError(
                "memory is off on this server (memory.enabled: false); ask the operator to enable it",
                param="memory",
            )
        return self.client

    async def list(
        self, tenant: str, user: str, include_history: bool, limit: int, offset: int
    ) -> dict[str, Any]:
        return await self._memory_client().list(tenant, user, include_history, limit, offset)

    async def search(self, tenant: str, request: MemorySearchRequest | dict) -> dict[str, Any]:
        body = _parse_body(MemorySearchRequest, request)
        return await self._memory_client().search(tenant, body.user, body.query, body.limit)

    async def add(self, tenant: str, request: MemoryCreateRequest | dict) -> dict[str, Any]:
        body = _parse_body(MemoryCreateRequest, request)
        fields = body.model_dump(exclude={"user"})
        return await self._memory_client().add(tenant, body.user, **fields)

    async def add_turn(self, tenant: str, request: MemoryTurnRequest | dict) -> dict[str, Any]:
        body = _parse_body(MemoryTurnRequest, request)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        result = await self._memory_client().absorb_turn(
            tenant, body.user, body.session_id, body.turn_id, messages, body.at
        )
        return {"object": "memory.turn", "session_id": body.session_id, "turn_id": body.turn_id, **result}

    async def get(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self._memory_client().get(tenant, user, memory_id)

    async def delete(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self._memory_client().delete(tenant, user, memory_id)

    async def delete_all(self, tenant: str, user: str) -> dict[str, Any]:
        return await self._memory_client().delete_all(tenant, user)

    async def usage(self, tenant: str) -> dict[str, Any]:
        return await self._memory_client().usage(tenant)

    async def forget_session(self, tenant: str, session_id: str) -> None:
        """What memory absorbed from a deleted session goes with it (no-op when memory is off)."""
        if self.client is not None:
            await self.client.forget_session(tenant, session_id)


def _parse_body(model: type, value: Any) -> Any:
    from deployments.errors import as_mai_error
    from deployments.protocol import parse_request

    try:
        return parse_request(model, value)
    except Exception as exc:
        raise as_mai_error(exc) from None


__all__ = ["IngressMemory"]
