"""The typed events of a streamed response, built from the chat stream's chunks.

``response.output_item.added`` / ``response.content_part.added`` open the message on its first
text, then ``response.output_text.delta`` per fragment; a tool call opens its
``function_call`` item on its first delta and sends each ``function.arguments`` fragment as
``response.function_call_arguments.delta``. ``finish`` closes every open item
(``...text.done``, ``...content_part.done``, ``...arguments.done``, ``...output_item.done``)
and gives the output items in order.
"""

from __future__ import annotations

import uuid
from typing import Any


class ResponseEvents:
    """Stream events with their ``sequence_number``, and the output they describe."""

    def __init__(self) -> None:
        self.sequence = 0
        self.message_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.text: list[str] = []
        self.started = False  # the message item is open
        self.calls: dict[int, dict[str, Any]] = {}  # by the chunk's tool-call index
        self.order: list[tuple[str, int]] = []  # ("message", 0) / ("call", index) by output index
        self.usage: Any = None
        self.finish_reason: str | None = None

    def make(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def on_chunk(self, chunk: Any) -> list[dict[str, Any]]:
        """The events one chat chunk makes (its first choice)."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        events: list[dict[str, Any]] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            self.finish_reason = choice.finish_reason or self.finish_reason
            if delta.content:
                if not self.started:
                    events += self._open_message()
                self.text.append(delta.content)
                events.append(self.make(
                    "response.output_text.delta", item_id=self.message_id,
                    output_index=self._index("message", 0), content_index=0, delta=delta.content,
                    logprobs=[],
                ))
            for d in delta.tool_calls or ():
                events += self._on_call_delta(d)
        return events

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(closing events, output items)``; an answer with neither text nor calls is an
        empty message."""
        if not self.order:
            events = self._open_message()
        else:
            events = []
        items = []
        for index, (kind, key) in enumerate(self.order):
            if kind == "message":
                item = self._message_item()
                part = item["content"][0]
                events += [
                    self.make("response.output_text.done", item_id=item["id"], output_index=index,
                              content_index=0, text=part["text"], logprobs=[]),
                    self.make("response.content_part.done", item_id=item["id"], output_index=index,
                              content_index=0, part=part),
                ]
            else:
                item = {**self.calls[key]["item"], "status": "completed"}
                events.append(self.make("response.function_call_arguments.done", item_id=item["id"],
                                        output_index=index, arguments=item["arguments"]))
            events.append(self.make("response.output_item.done", output_index=index, item=item))
            items.append(item)
        return events, items

    # -- internals ----------------------------------------------------------------------------

    def _index(self, kind: str, key: int) -> int:
        return self.order.index((kind, key))

    def _open_message(self) -> list[dict[str, Any]]:
        self.started = True
        self.order.append(("message", 0))
        index = len(self.order) - 1
        item = {"type": "message", "id": self.message_id, "status": "in_progress", "role": "assistant",
                "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.make("response.output_item.added", output_index=index, item=item),
            self.make("response.content_part.added", item_id=self.message_id, output_index=index,
                      content_index=0, part=part),
        ]

    def _message_item(self) -> dict[str, Any]:
        part = {"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": "completed", "role": "assistant",
                "content": [part]}

    def _on_call_delta(self, d: Any) -> list[dict[str, Any]]:
        events = []
        call = self.calls.get(d.index)
        name = (d.function.name if d.function else None) or ""
        fragment = (d.function.arguments if d.function else None) or ""
        if call is None:
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}",
                    "call_id": d.id or f"call_{uuid.uuid4().hex[:24]}", "name": name,
                    "arguments": "", "status": "in_progress"}
            call = self.calls[d.index] = {"item": item}
            self.order.append(("call", d.index))
            events.append(self.make("response.output_item.added", output_index=len(self.order) - 1,
                                    item=dict(item)))
        elif name:
            call["item"]["name"] += name
        if fragment:
            call["item"]["arguments"] += fragment
            events.append(self.make("response.function_call_arguments.delta", item_id=call["item"]["id"],
                                    output_index=self._index("call", d.index), delta=fragment))
        return events


__all__ = ["ResponseEvents"]
