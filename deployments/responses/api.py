"""The Responses API and conversations, mixed into the ingress (``deployments.ingress.deployment``).

A response is a chat completion on a server-side session (``deployments.responses.store``):
its ``input`` items become the new turn, ``instructions`` a system message for this response
only, and the answer goes through the same path as a chat request with ``session_id`` (the
user's memory recall, the output pipeline, the session append, memory absorption). Output is
OpenAI's items: a ``message`` with ``output_text``, or ``function_call`` items. A stream sends
the typed events ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ... ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` (or
``response.function_call_arguments.delta``/``.done`` for calls) and ``response.completed``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cluster.errors import InvalidRequestError
from deployments.ingress.auth import DEFAULT_TENANT
from deployments.protocol import ChatCompletionRequest, ChatMessage, parse_request
from deployments.protocol_responses import (
    ConversationCreateRequest,
    ConversationItemsRequest,
    ResponseCreateRequest,
)
from deployments.responses.items import (
    conversation_items,
    input_messages,
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


def _parse(model: type, value: Any) -> Any:
    from deployments.errors import as_mai_error

    try:
        return parse_request(model, value)
    except Exception as exc:
        raise as_mai_error(exc) from None


class IngressResponses:
    """``/v1/responses`` and ``/v1/conversations`` (needs the ingress's ``sessions``,
    ``chat``, ``chat_stream``, ``session_context``, ``delete_session`` and ``_model``)."""

    @property
    def responses(self) -> ResponseStore:
        store = self.__dict__.get("_response_store")
        if store is None:
            store = self.__dict__["_response_store"] = ResponseStore(self.sessions)  # type: ignore[attr-defined]
        return store

    # -- responses ----------------------------------------------------------------------------

    async def create_response(
        self, request: ResponseCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse(ResponseCreateRequest, request)
        chat, context, previous, _ = await self._response_chat(body, tenant, stream=False)
        answer = await self.chat(chat, tenant, context)  # type: ignore[attr-defined]
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
        events = _Events()
        # The id the response will have once stored (the session's count after this turn).
        turn = [m for m in chat.messages if m.role not in ("system", "developer")]
        expected = response_id(chat.session_id, base + len(turn) + 1) if chat.session_id else None
        draft = response_object(
            expected or f"resp_{uuid.uuid4().hex}", body, [], None, None, previous, "in_progress"
        )
        chunks = self.chat_stream(chat, tenant, context)  # type: ignore[attr-defined]
        first = await chunks.__anext__()  # a failure here is the request's error status
        yield events.make("response.created", response=draft)
        yield events.make("response.in_progress", response=draft)
        text, usage, finish, calls = [], None, None, {}
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        started = False

        async def all_chunks():
            yield first
            async for chunk in chunks:
                yield chunk

        async for chunk in all_chunks():
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                finish = choice.finish_reason or finish
                for call in delta.tool_calls or ():
                    entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
                if delta.content:
                    if not started:
                        started = True
                        for event in events.message_start(message_id):
                            yield event
                    text.append(delta.content)
                    yield events.make(
                        "response.output_text.delta", item_id=message_id, output_index=0,
                        content_index=0, delta=delta.content, logprobs=[],
                    )
        from deployments.protocol_tools import FunctionCallOut, ToolCallOut

        tool_calls = [
            ToolCallOut(id=c["id"] or f"call_{uuid.uuid4().hex[:24]}",
                        function=FunctionCallOut(name=c["name"], arguments=c["arguments"]))
            for _, c in sorted(calls.items())
        ]
        items = output_items(None, "".join(text), tool_calls, message_id)
        for index, item in enumerate(items):
            if item["type"] == "message":
                if not started:
                    for event in events.message_start(message_id):
                        yield event
                for event in events.message_done(item, index):
                    yield event
            else:
                yield events.make("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"})
                yield events.make("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=index, delta=item["arguments"])
                yield events.make("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=index, arguments=item["arguments"])
                yield events.make("response.output_item.done", output_index=index, item=item)
        rid = self._response_id(chat, context)
        response = response_object(rid, body, items, usage, finish, previous)
        await self._keep(chat, tenant, context, response)
        yield events.make("response.completed", response=response)

    async def get_response(self, rid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        _, _, stored = await self.responses.load_response(rid, tenant, "response_id")
        return stored

    async def delete_response(self, rid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        sid, empty = await self.responses.forget(rid, tenant)
        if empty:
            await self.delete_session(sid, tenant)  # type: ignore[attr-defined]
        return {"id": rid, "object": "response", "deleted": True}

    async def _response_chat(
        self, body: ResponseCreateRequest, tenant: str, stream: bool
    ) -> tuple[ChatCompletionRequest, Any, str | None, int]:
        """The chat request of a response (with ``session_id`` when it is stored), its session
        context, ``previous_response_id`` and the session's message count before it."""
        self._model(body.model)  # type: ignore[attr-defined]
        new = input_messages(body.input)
        history: list[dict[str, str]] = []
        sid = None
        base = 0
        previous = body.previous_response_id
        if previous:
            session, count, _ = await self.responses.load_response(previous, tenant, "previous_response_id")
            if not body.store:
                history = list(session.get("messages") or [])[:count]
            elif session["turns"] == count:
                sid, base = session["id"], count
            else:
                sid, base = await self.responses.fork(tenant, session, count), count
        elif body.conversation_id:
            csid = parse_conversation_id(body.conversation_id)
            session = await self.responses.load(csid, tenant, "conversation", "conversation")
            if body.store:
                sid, base = csid, session["turns"]
            else:
                history = list(session.get("messages") or [])
        elif body.store:
            sid = (await self.responses.create(tenant, "responses", body.user))["id"]
        head = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        messages = head + [ChatMessage.model_validate(m) for m in history] + new
        fields: dict[str, Any] = {
            "model": body.model, "messages": messages, "session_id": sid, "stream": stream,
            "max_tokens": body.max_output_tokens, "temperature": body.temperature,
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
        context = await self.session_context(chat, tenant)  # type: ignore[attr-defined]
        return chat, context, previous, base

    @staticmethod
    def _response_id(chat: ChatCompletionRequest, context: Any) -> str:
        if chat.session_id and context.stored_count is not None:
            return response_id(chat.session_id, context.stored_count)
        return f"resp_{uuid.uuid4().hex}"

    async def _keep(self, chat: ChatCompletionRequest, tenant: str, context: Any, response: dict) -> None:
        if chat.session_id and context.stored_count is not None:
            await self.responses.record(chat.session_id, tenant, context.stored_count, response)

    # -- conversations ------------------------------------------------------------------------

    async def create_conversation(
        self, request: ConversationCreateRequest | dict | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        body = _parse(ConversationCreateRequest, request or {})
        info = await self.responses.create(tenant, "conversation", None, body.metadata)
        if body.items:
            messages = [m.as_dict() for m in input_messages(body.items, "items")]
            await self.responses.append(info["id"], tenant, messages)
        return _conversation(info)

    async def get_conversation(self, cid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        session = await self.responses.load(parse_conversation_id(cid, "conversation_id"), tenant,
                                            "conversation_id", "conversation")
        return _conversation(session)

    async def delete_conversation(self, cid: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        sid = parse_conversation_id(cid, "conversation_id")
        await self.responses.load(sid, tenant, "conversation_id", "conversation")
        await self.delete_session(sid, tenant)  # type: ignore[attr-defined]
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    async def list_conversation_items(
        self, cid: str, tenant: str = DEFAULT_TENANT, limit: int = 20, order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise InvalidRequestError(f"order={order!r} is not asc or desc", param="order")
        session = await self.responses.load(parse_conversation_id(cid, "conversation_id"), tenant,
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
        session = await self.responses.load(sid, tenant, "conversation_id", "conversation")
        before = session["turns"]
        messages = [m.as_dict() for m in input_messages(body.items, "items")]
        await self.responses.append(sid, tenant, messages)
        session = await self.responses.load(sid, tenant, "conversation_id", "conversation")
        added = conversation_items(session)[before:]
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


class _Events:
    """Typed stream events with their ``sequence_number``."""

    def __init__(self) -> None:
        self.sequence = 0

    def make(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def message_start(self, message_id: str) -> list[dict[str, Any]]:
        item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.make("response.output_item.added", output_index=0, item=item),
            self.make("response.content_part.added", item_id=message_id, output_index=0,
                      content_index=0, part=part),
        ]

    def message_done(self, item: dict[str, Any], index: int) -> list[dict[str, Any]]:
        part = item["content"][0]
        return [
            self.make("response.output_text.done", item_id=item["id"], output_index=index,
                      content_index=0, text=part["text"], logprobs=[]),
            self.make("response.content_part.done", item_id=item["id"], output_index=index,
                      content_index=0, part=part),
            self.make("response.output_item.done", output_index=index, item=item),
        ]


__all__ = ["IngressResponses"]
