"""The Responses API and conversations: a part the ingress holds (``Ingress.responses``).

A response is a chat completion on a server-side session (``deployments.responses.store``):
its ``input`` items become the new turn, ``instructions`` a system message for this response
only, and the answer goes through the ingress's chat path (the output pipeline, the session
append, memory absorption). Output is OpenAI's items: a ``message`` with ``output_text``, or
``function_call`` items; calls and their results are stored typed, so GET, conversation items
and a fork give them back as items. A stream sends the typed events of
``deployments.responses.events`` between ``response.created``/``response.in_progress`` and
``response.completed``.

``truncation``: ``"disabled"`` (OpenAI's default) sends the whole chain (instructions, every
earlier item, the input) and nothing is dropped: one that does not fit the model's context is
a 400 naming the context length. ``"auto"`` lets the server fit it: the oldest items after the
instructions are dropped (with memory on, the user's memory recall assembles the context).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cluster.errors import InvalidRequestError
from deployments.ingress.auth import DEFAULT_TENANT
from deployments.ingress.stores.memory import IngressMemory, SessionContext
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    parse_request,
)
from deployments.protocol_responses import (
    ConversationCreateRequest,
    ConversationItemsRequest,
    ResponseCreateRequest,
)
from deployments.responses.events import ResponseEvents
from deployments.responses.items import (
    conversation_items,
    input_messages,
    model_view,
    output_items,
    response_object,
)
from deployments.responses.store import (
    KIND,
    ResponseStore,
    conversation_id,
    parse_conversation_id,
    response_id,
)

# The ingress's chat path (``Ingress.chat`` / ``Ingress.chat_stream``): a request, its tenant and
# the session context this part built.
ChatCall = Callable[[ChatCompletionRequest, str, SessionContext], Awaitable[ChatCompletionResponse]]
ChatStreamCall = Callable[[ChatCompletionRequest, str, SessionContext], AsyncIterator[ChatCompletionChunk]]
DeleteSession = Callable[[str, str], Awaitable[Any]]


def _parse(model: type, value: Any) -> Any:
    from deployments.errors import as_mai_error

    try:
        return parse_request(model, value)
    except Exception as exc:
        raise as_mai_error(exc) from None


def _too_long(exc: BaseException) -> BaseException:
    """A context-length refusal names ``truncation`` as the way out."""
    if isinstance(exc, InvalidRequestError) and "maximum context length" in exc.message:
        return InvalidRequestError(
            f"{exc.message} With truncation='disabled' (the default) no earlier item is dropped; "
            "send truncation='auto' to drop the oldest ones, or shorten the input.",
            param="input",
        )
    return exc


class ResponsesApi:
    """``/v1/responses`` and ``/v1/conversations`` over the session store (``store``), the
    ingress's chat path (``chat``, ``chat_stream``), its session contexts (``memory``),
    ``delete_session`` (which makes memory forget too) and ``check_model`` (404 for a model
    not served)."""

    def __init__(
        self,
        *,
        store: ResponseStore,
        memory: IngressMemory,
        chat: ChatCall,
        chat_stream: ChatStreamCall,
        delete_session: DeleteSession,
        check_model: Callable[[str], Any],
    ) -> None:
        self.store = store
        self.memory = memory
        self.chat = chat
        self.chat_stream = chat_stream
        self.delete_session = delete_session
        self.check_model = check_model

    # -- responses ----------------------------------------------------------------------------

    async def create_response(
        self, request: ResponseCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse(ResponseCreateRequest, request)
        chat, context, previous, _ = await self._response_chat(body, tenant, stream=False)
        try:
            answer = await self.chat(chat, tenant, context)
        except Exception as exc:
            raise _too_long(exc) from None
        items = output_items(answer.choices[0])
        rid = self._response_id(chat, context)
        response = response_object(
            rid, body, items, answer.usage, answer.choices[0].finish_reason, previous
        )
        await self._keep(chat, tenant, context, response)
        return response

    async def create_response_stream(
        self, request: ResponseCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[dict[str, Any]]:
        body = _parse(ResponseCreateRequest, request)
        chat, context, previous, base = await self._response_chat(body, tenant, stream=True)
        events = ResponseEvents()
        # The id the response will have once stored (the session's count after this turn).
        turn = [m for m in chat.messages if m.role not in ("system", "developer")]
        expected = response_id(chat.session_id, base + len(turn) + 1) if chat.session_id else None
        draft = response_object(
            expected or f"resp_{uuid.uuid4().hex}", body, [], None, None, previous, "in_progress"
        )
        chunks = self.chat_stream(chat, tenant, context)
        try:
            first = await chunks.__anext__()  # a failure here is the request's error status
        except Exception as exc:
            raise _too_long(exc) from None
        yield events.make("response.created", response=draft)
        yield events.make("response.in_progress", response=draft)
        for event in events.on_chunk(first):
            yield event
        async for chunk in chunks:
            for event in events.on_chunk(chunk):
                yield event
        closing, items = events.finish()
        for event in closing:
            yield event
        rid = self._response_id(chat, context)
        response = response_object(rid, body, items, events.usage, events.finish_reason, previous)
        await self._keep(chat, tenant, context, response)
        yield events.make("response.completed", response=response)

    async def get_response(self, rid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        _, _, stored = await self.store.load_response(rid, tenant, "response_id")
        return stored

    async def delete_response(self, rid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        sid, empty = await self.store.forget(rid, tenant)
        if empty:
            await self.delete_session(sid, tenant)
        return {"id": rid, "object": "response", "deleted": True}

    async def _response_chat(
        self, body: ResponseCreateRequest, tenant: str, stream: bool
    ) -> tuple[ChatCompletionRequest, SessionContext, str | None, int]:
        """The chat request of a response (with ``session_id`` when it is stored), its session
        context, ``previous_response_id`` and the session's message count before it."""
        self.check_model(body.model)
        new = input_messages(body.input)
        history: list[dict[str, Any]] = []
        sid = None
        base = 0
        previous = body.previous_response_id
        if previous:
            session, count, _ = await self.store.load_response(previous, tenant, "previous_response_id")
            if not body.store:
                history = list(session.get("messages") or [])[:count]
            elif session["message_count"] == count:  # the chain's latest response
                sid, base = session["id"], count
            else:
                sid, base = await self.store.fork(tenant, session, count), count
        elif body.conversation_id:
            csid = parse_conversation_id(body.conversation_id)
            session = await self.store.load(csid, tenant, "conversation", "conversation")
            if body.store:
                sid, base = csid, session["message_count"]
            else:
                history = list(session.get("messages") or [])
        elif body.store:
            sid = (await self.store.create(tenant, "responses", body.user))["id"]
        head = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        fields: dict[str, Any] = {
            "model": body.model, "messages": head + model_view(history) + new, "session_id": sid,
            "stream": stream, "max_tokens": body.max_output_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "user": body.user, "parallel_tool_calls": body.parallel_tool_calls,
        }
        if stream:
            fields["stream_options"] = {"include_usage": True}
        if body.tools:
            fields["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in body.tools
            ]
        choice = body.tool_choice
        if choice is not None:
            fields["tool_choice"] = choice if isinstance(choice, str) else {
                "type": "function", "function": {"name": choice.name}
            }
        fmt = body.text.format if body.text is not None else None
        if fmt is not None and fmt.get("type") == "json_schema":
            spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            fields["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt is not None:
            fields["response_format"] = dict(fmt)
        try:
            chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except Exception as exc:
            from deployments.errors import as_mai_error

            raise as_mai_error(exc) from None
        auto = body.truncation == "auto"
        if sid is None:  # unstored: the history travels in the request; "auto" may drop it
            return chat, SessionContext(chat, len(head) + len(history) if auto else 0), previous, base
        context = await self.memory.session_context(chat, tenant, whole=not auto)
        return chat, context, previous, base

    @staticmethod
    def _response_id(chat: ChatCompletionRequest, context: SessionContext) -> str:
        if chat.session_id and context.stored_count is not None:
            return response_id(chat.session_id, context.stored_count)
        return f"resp_{uuid.uuid4().hex}"

    async def _keep(
        self, chat: ChatCompletionRequest, tenant: str, context: SessionContext, response: dict
    ) -> None:
        if chat.session_id and context.stored_count is not None:
            await self.store.record(chat.session_id, tenant, context.stored_count, response)

    # -- conversations ------------------------------------------------------------------------

    async def create_conversation(
        self, request: ConversationCreateRequest | dict | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse(ConversationCreateRequest, request or {})
        info = await self.store.create(tenant, "conversation", None, body.metadata)
        if body.items:
            messages = [m.stored() for m in input_messages(body.items, "items")]
            await self.store.append(info["id"], tenant, messages)
        return _conversation(info)

    async def get_conversation(self, cid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        session = await self.store.load(parse_conversation_id(cid, "conversation_id"), tenant,
                                        "conversation_id", "conversation")
        return _conversation(session)

    async def delete_conversation(self, cid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        sid = parse_conversation_id(cid, "conversation_id")
        await self.store.load(sid, tenant, "conversation_id", "conversation")
        await self.delete_session(sid, tenant)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    async def list_conversation_items(
        self, cid: str, tenant: str = DEFAULT_TENANT, limit: int = 20, order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise InvalidRequestError(f"order={order!r} is not asc or desc", param="order")
        session = await self.store.load(parse_conversation_id(cid, "conversation_id"), tenant,
                                        "conversation_id", "conversation")
        items = conversation_items(session)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list", "data": page, "has_more": len(items) > len(page),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
        }

    async def add_conversation_items(
        self, cid: str, request: ConversationItemsRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse(ConversationItemsRequest, request)
        sid = parse_conversation_id(cid, "conversation_id")
        session = await self.store.load(sid, tenant, "conversation_id", "conversation")
        before = session["message_count"]
        messages = [m.stored() for m in input_messages(body.items, "items")]
        await self.store.append(sid, tenant, messages)
        session = await self.store.load(sid, tenant, "conversation_id", "conversation")
        added = conversation_items(session, before)
        return {
            "object": "list", "data": added, "has_more": False,
            "first_id": added[0]["id"] if added else None, "last_id": added[-1]["id"] if added else None,
        }


def _conversation(session: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in (session.get("metadata") or {}).items() if k != KIND and not k.startswith("resp.")}
    return {
        "id": conversation_id(session["id"]), "object": "conversation",
        "created_at": session.get("created") or int(time.time()), "metadata": metadata,
    }


__all__ = ["ResponsesApi", "ChatCall", "ChatStreamCall", "DeleteSession"]
