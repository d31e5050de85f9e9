"""Tool calls read out of decoding-constrained JSON while it is generated, so that a stream
sends each call's ``function.arguments`` as it grows (OpenAI's shape: a first delta with
``index``, ``id``, ``type``, ``function.name`` and ``arguments: ""``, then argument fragments).

Only for ``tool_choice`` ``required`` or a named function: decoding follows the call schema
of ``deployments.ingress.openai_api.tool_calls.call_schema`` (``{"name": ..., "arguments": {...}}``, or
a list of such objects), so the text is a call from its first character. A call's first delta
goes out once its name is complete; the fragments are the raw text of its ``arguments``
object, whose concatenation is that object as the model wrote it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from deployments.protocol_tools import FunctionCallDelta, ToolCallDelta, tool_call_id

WHITESPACE = " \t\r\n"


@dataclass
class _Call:
    id: str = field(default_factory=tool_call_id)
    name: str | None = None
    arguments: str = ""
    sent: int = -1  # characters of ``arguments`` sent; -1 until the first delta


class ToolCallStream:
    """Feed the constrained text as it comes; each ``feed`` gives the deltas it completes."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._stack: list[str] = []  # open "{" and "[" of the whole text
        self._call_depth: int | None = None  # stack depth inside a call object: 1, or 2 in a list
        self._in_string = False
        self._escaped = False
        self._string = ""  # a key or the name, at the call object's level
        self._key: str | None = None
        self._after_colon = False  # the next string at the call level is a value, not a key
        self._arguments = False  # inside the current call's arguments value
        self._await_arguments = False  # past '"arguments":', before the value's first character

    @property
    def started(self) -> bool:
        """Whether a call's first delta has gone out."""
        return any(c.sent >= 0 for c in self.calls)

    def feed(self, text: str) -> list[ToolCallDelta]:
        for char in text:
            self._read(char)
        deltas = []
        for index, call in enumerate(self.calls):
            if call.name is None:
                continue  # its name is not complete: nothing goes out yet
            if call.sent < 0:
                deltas.append(ToolCallDelta(index=index, id=call.id, type="function",
                                            function=FunctionCallDelta(name=call.name, arguments="")))
                call.sent = 0
            if len(call.arguments) > call.sent:
                deltas.append(ToolCallDelta(
                    index=index, function=FunctionCallDelta(arguments=call.arguments[call.sent:])
                ))
                call.sent = len(call.arguments)
        return deltas

    # -- the scanner --------------------------------------------------------------------------

    def _read(self, char: str) -> None:
        if self._await_arguments and char not in WHITESPACE:
            self._await_arguments, self._arguments = False, True
        if self._arguments:
            self.calls[-1].arguments += char
            self._read_nested(char)
            return
        if self._in_string:
            if self._string_char(char):
                self._end_string()
                return
            self._string += char
            return
        if char == '"':
            self._in_string, self._string = True, ""
        elif char in "{[":
            if self._call_depth is None:
                self._call_depth = 1 if char == "{" else 2
            self._stack.append(char)
            if char == "{" and len(self._stack) == self._call_depth:
                self.calls.append(_Call())
                self._key, self._after_colon = None, False
        elif char in "}]":
            if self._stack:
                self._stack.pop()
        elif len(self._stack) == self._call_depth:
            if char == ":":
                self._after_colon = True
                self._await_arguments = self._key == "arguments"
            elif char == ",":
                self._key, self._after_colon = None, False

    def _string_char(self, char: str) -> bool:
        """A character inside a JSON string (escapes followed); True when it closes the string."""
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            return True
        return False

    def _read_nested(self, char: str) -> None:
        """A character of the arguments value; it ends when its brackets close."""
        if self._in_string:
            self._string_char(char)
            return
        if char == '"':
            self._in_string = True
        elif char in "{[":
            self._stack.append(char)
        elif char in "}]" and self._stack:
            self._stack.pop()
        if len(self._stack) == self._call_depth:  # back at the call object: the value is whole
            self._arguments = False

    def _end_string(self) -> None:
        if len(self._stack) != self._call_depth or not self.calls:
            return
        try:
            value = json.loads(f'"{self._string}"')
        except ValueError:
            value = self._string
        if not self._after_colon:
            self._key = value
        elif self._key == "name":
            self.calls[-1].name = value


__all__ = ["ToolCallStream"]
