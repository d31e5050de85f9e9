"""Items of the Responses API in and out: input items to chat messages, a chat choice to
output items, the response object, and a session's messages as conversation items.

Input items: messages (``{"role", "content"}``, ``type`` optional; content a string or
``input_text``/``output_text`` parts; roles user, system, developer, assistant),
``function_call`` (an earlier call of the model) and ``function_call_output`` (its result).
The session store keeps turns of roles system/user/assistant whose text is what the model
reads (a call as the JSON the model wrote, a result as a user turn ``[result of tool call
<id>]``); calls and results also keep their typed ``tool_items`` (``cluster.state.Message``),
so a conversation's items and a fork give them back as function_call / function_call_output.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cluster.errors import InvalidRequestError
from deployments.protocol import ChatChoice, ChatMessage, Usage
from deployments.protocol_responses import ResponseCreateRequest

TEXT_PARTS = ("input_text", "output_text", "text")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise InvalidRequestError(
                f"{where}[{j}].type={kind!r} is not supported: the models read text only "
                f"(input_text)",
                param=f"{where}[{j}].type",
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def input_messages(value: str | list[dict[str, Any]], field: str = "input") -> list[ChatMessage]:
    """Chat messages from the ``input`` of a response (or a conversation's ``items``)."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        try:
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "system", "developer", "assistant"):
                    raise InvalidRequestError(
                        f"{where}.role={role!r} is not user, system, developer or assistant",
                        param=f"{where}.role",
                    )
                messages.append(ChatMessage(role=role, content=_text(item.get("content"), f"{where}.content")))
            elif kind == "function_call":
                call = {
                    "id": str(item.get("call_id") or item.get("id") or ""),
                    "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", "{}"))},
                }
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant" and last.tool_calls and last.content is None:
                    last.tool_calls.append(ChatMessage.model_validate(
                        {"role": "assistant", "tool_calls": [call]}).tool_calls[0])
                else:
                    messages.append(ChatMessage.model_validate({"role": "assistant", "tool_calls": [call]}))
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append(ChatMessage(
                    role="tool", tool_call_id=str(item.get("call_id", "")),
                    content=output if isinstance(output, str) else _text(output, f"{where}.output"),
                ))
            else:
                raise InvalidRequestError(
                    f"{where}.type={kind!r} is not supported; use message, function_call or "
                    "function_call_output",
                    param=f"{where}.type",
                )
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise InvalidRequestError(f"{where} is invalid: {exc}", param=where) from None
    return messages


def output_items(
    choice: ChatChoice | None, text: str = "", tool_calls: list | None = None, message_id: str | None = None
) -> list[dict[str, Any]]:
    """The output items of a chat choice (or of a stream's text and calls)."""
    if choice is not None:
        text = choice.message.content or ""
        tool_calls = choice.message.tool_calls
    if tool_calls:
        return [
            {
                "type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call.id,
                "name": call.function.name, "arguments": call.function.arguments, "status": "completed",
            }
            for call in tool_calls
        ]
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return [{
        "type": "message", "id": message_id or f"msg_{uuid.uuid4().hex[:24]}",
        "status": "completed", "role": "assistant", "content": [part],
    }]


def response_object(
    rid: str,
    body: ResponseCreateRequest,
    output: list[dict[str, Any]],
    usage: Usage | None,
    finish_reason: str | None,
    previous: str | None,
    status: str | None = None,
) -> dict[str, Any]:
    """The response in OpenAI's shape."""
    if status is None:
        status = "incomplete" if finish_reason in ("length", "content_filter") else "completed"
    incomplete = None
    if status == "incomplete":
        reason = "max_output_tokens" if finish_reason == "length" else "content_filter"
        incomplete = {"reason": reason}
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
    choice = body.tool_choice
    fmt = body.text.format if body.text is not None and body.text.format else {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "model": body.model, "output": output, "instructions": body.instructions,
        "previous_response_id": previous, "store": body.store,
        "conversation": {"id": body.conversation_id} if body.conversation_id else None,
        "temperature": body.temperature, "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens, "tools": tools,
        "tool_choice": choice if isinstance(choice, str) or choice is None else choice.model_dump(),
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "text": {"format": fmt}, "truncation": body.truncation or "disabled",
        "metadata": body.metadata or {}, "user": body.user, "error": None,
        "incomplete_details": incomplete,
        "usage": None if usage is None else {
            "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def conversation_items(session: dict[str, Any], start: int = 0) -> list[dict[str, Any]]:
    """A session's messages from position ``start`` on as conversation items, oldest first
    (ids ``msg_<position>``; a call ``fc_<position>_<k>``, a result ``fco_<position>_<k>``)."""
    items: list[dict[str, Any]] = []
    for i, m in enumerate(session.get("messages") or []):
        if i < start:
            continue
        for k, tool in enumerate(m.get("tool_items") or ()):
            if tool["type"] == "function_call":
                items.append({
                    "type": "function_call", "id": f"fc_{i}_{k}", "call_id": tool["call_id"],
                    "name": tool["name"], "arguments": tool["arguments"], "status": "completed",
                })
            else:
                items.append({
                    "type": "function_call_output", "id": f"fco_{i}_{k}", "call_id": tool["call_id"],
                    "output": tool["output"], "status": "completed",
                })
        if m.get("tool_items"):
            continue
        kind = "output_text" if m["role"] == "assistant" else "input_text"
        items.append({
            "type": "message", "id": f"msg_{i}", "status": "completed", "role": m["role"],
            "content": [{"type": kind, "text": m["content"]}],
        })
    return items


def model_view(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """Stored messages as the model reads them (their text; tool items rendered)."""
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]


__all__ = ["input_messages", "output_items", "response_object", "conversation_items", "model_view"]
