"""The ingress's half of the conversation memory (mixed into ``deployments.ingress.Ingress``).

Request path, for a chat request with a ``session_id`` (docs/memory.md, "Over HTTP"):

1. ``session_context`` reads the session (messages, system prompt, user) and asks the user's
   memory shard for a ``MemoryRecall`` (ranked facts, summaries, the recent turns). The
   LLMServer then assembles the prompt from it (``actors.memory_context``). Without memory
   (``memory.enabled: false``) or when its shard cannot answer, the session's messages are put
   in front of the request and the LLMServer's sliding window fits them, as before.
2. ``remember_turn`` hands the finished turn to memory in the background, after the session
   append; the reply never waits for it.

And the memory API (``/v1/memories``, also a handle API): list, search, add, read, delete a
user's memories and the tenant's usage, all scoped by the caller's tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.errors import NotFoundError
from deployments.auth import DEFAULT_TENANT
from deployments.memory_client import MemoryClient, memory_user
from deployments.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    MemoryCreateRequest,
    MemorySearchRequest,
)


@dataclass
class SessionContext:
    """What a session request carries to the model and back to the store."""

    request: ChatCompletionRequest  # what the LLMServer gets (session_id cleared)
    history_len: int  # leading session messages in ``request`` (the sliding-window path)
    user: str | None = None  # whose memory (memory on)
    recall: Any = None  # a MemoryRecall: the LLMServer assembles the prompt from it
    system_prompt: str | None = None
    stored_count: int | None = None  # the session's message count once the turn is stored
    answer: str = ""  # a streamed answer's text when it is not content (tool calls)


def _last_user_text(request: ChatCompletionRequest) -> str | None:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text()
    return None


class IngressMemory:
    """Memory for the ingress (needs ``self.sessions``, ``self.observe`` and ``self.memory``:
    a ``MemoryClient`` or None when memory is off)."""

    memory: MemoryClient | None

    async def session_context(self, request: ChatCompletionRequest, tenant: str) -> SessionContext:
        if not request.session_id:
            return SessionContext(request, 0)
        sid = request.session_id
        with self.observe.timed("memory_retrieval", request.model):  # type: ignore[attr-defined]
            with self.observe.session_op("context"):  # type: ignore[attr-defined]
                if self.memory is None:
                    history = await self.sessions.context(sid, tenant)  # type: ignore[attr-defined]
                    session: dict[str, Any] = {}
                else:
                    session = await self.sessions.details(sid, tenant)  # type: ignore[attr-defined]
            if self.memory is not None:
                system_prompt = session.get("system_prompt")
                messages = session.get("messages") or []
                user = memory_user(request.user, session.get("user"), sid)
                recall = await self.memory.recall(tenant, user, sid, _last_user_text(request), messages)
                if recall is not None:
                    plain = request.model_copy(update={"session_id": None})
                    return SessionContext(plain, 0, user, recall, system_prompt)
                head = [{"role": "system", "content": system_prompt}] if system_prompt else []
                history = head + list(messages)
        full = [ChatMessage.model_validate(m) for m in history] + list(request.messages)
        update = {"messages": full, "session_id": None}
        return SessionContext(
            request.model_copy(update=update), len(history), user if self.memory else None
        )

    def remember_turn(
        self, context: SessionContext, tenant: str, session_id: str, turn_id: int, turn: list[dict[str, str]]
    ) -> None:
        """Memory absorbs the stored turn in the background (``turn_id``: the session's
        message count after the append)."""
        if self.memory is not None and context.user is not None:
            self.memory.absorb(tenant, context.user, session_id, turn_id, turn)

    # -- the memory API -----------------------------------------------------------------------

    def _memory_client(self) -> MemoryClient:
        if self.memory is None:
            raise NotFoundError(
                "memory is off on this server (memory.enabled: false); ask the operator to enable it",
                param="memory",
            )
        return self.memory

    async def list_memories(
        self,
        user: str,
        tenant: str = DEFAULT_TENANT,
        include_history: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        return await self._memory_client().list(tenant, user, include_history, limit, offset)

    async def search_memories(
        self, request: MemorySearchRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse_body(MemorySearchRequest, request)
        return await self._memory_client().search(tenant, body.user, body.query, body.limit)

    async def add_memory(
        self, request: MemoryCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse_body(MemoryCreateRequest, request)
        fields = body.model_dump(exclude={"user"})
        return await self._memory_client().add(tenant, body.user, **fields)

    async def get_memory(self, memory_id: str, user: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self._memory_client().get(tenant, user, memory_id)

    async def delete_memory(
        self, memory_id: str, user: str, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self._memory_client().delete(tenant, user, memory_id)

    async def delete_memories(self, user: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self._memory_client().delete_all(tenant, user)

    async def memory_usage(self, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self._memory_client().usage(tenant)


def _parse_body(model: type, value: Any) -> Any:
    from deployments.errors import as_mai_error
    from deployments.protocol import parse_request

    try:
        return parse_request(model, value)
    except Exception as exc:
        raise as_mai_error(exc) from None


__all__ = ["IngressMemory", "SessionContext"]
