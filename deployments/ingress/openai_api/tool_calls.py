"""Tools for Llama 2, which has no native tool format: rendered into the prompt, parsed out of
the answer, and, for ``tool_choice`` ``required`` or a named function, enforced by decoding.

- Prompt: the tools (name, description, JSON schema of the arguments) and how to call them
  go at the end of the system prompt: "reply with only JSON ``{"name": ..., "arguments":
  {...}}``, or a JSON list of such objects for several calls".
- ``required`` / named: decoding is constrained (``engine.decoding.structured``, xgrammar) to that
  JSON with ``name`` one of the allowed functions and ``arguments`` matching that function's
  schema, so the arguments always parse and validate when the output is complete.
- ``auto``: an answer that is such JSON (alone) becomes tool calls; any other is content.
- ``parallel_tool_calls=false`` allows one call (an object), else 1 to ``MAX_PARALLEL_CALLS``
  (a list when constrained).

Earlier turns: an assistant message's ``tool_calls`` are rendered as that JSON, a ``tool``
message as a user turn ``[result of tool call <id>]`` (``protocol.ChatMessage.as_dict``);
consecutive turns of one role are merged so that Llama 2's alternation holds.
"""

from __future__ import annotations

import json
from typing import Any

from deployments.ingress.openai_api.outputs import Piece
from deployments.ingress.openai_api.tool_call_stream import ToolCallStream
from deployments.protocol import ChatCompletionRequest
from deployments.protocol_tools import FunctionCallOut, ToolCallOut, tool_call_id

MAX_PARALLEL_CALLS = 4
NO_ARGUMENTS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def tools_prompt(request: ChatCompletionRequest) -> str:
    """The text that tells the model about the request's tools ("" without tools)."""
    mode = request.tool_mode
    if mode == "none":
        return ""
    lines = ["You can call these functions:"]
    for tool in request.tools or ():
        f = tool.function
        schema = json.dumps(f.parameters or NO_ARGUMENTS_SCHEMA)
        lines.append(f"- {f.name}: {f.description or ''} Arguments (JSON schema): {schema}")
    several = request.parallel_tool_calls is not False
    lines.append(
        'To call a function, reply with only JSON: {"name": "<function name>", "arguments": '
        "{<arguments>}}"
        + (", or a JSON list of such objects to make several calls at once." if several else ".")
    )
    if mode == "required":
        lines.append("You must call at least one function now.")
    elif mode == "named":
        lines.append(f"You must call the function {request.named_tool} now.")
    else:
        lines.append("If no function helps, answer in plain text.")
    return "\n".join(lines)


def llama_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as Llama 2 turns: one leading system message (every system and
    developer message, wherever it stands, joined, plus the tools prompt), then user/assistant
    with consecutive turns of one role merged."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for message in request.messages:
        turn = message.as_dict()
        if turn["role"] == "system":  # Llama 2 has one system prompt, at the start
            system.append(turn["content"])
        elif turns and turns[-1]["role"] == turn["role"]:
            turns[-1] = {"role": turn["role"], "content": turns[-1]["content"] + "\n\n" + turn["content"]}
        else:
            turns.append(turn)
    extra = tools_prompt(request)
    if extra:
        system.append(extra)
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + turns


def call_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema decoding must follow (``required`` or named), else None."""
    mode = request.tool_mode
    if mode not in ("required", "named"):
        return None
    allowed = [
        t.function for t in request.tools or ()
        if mode == "required" or t.function.name == request.named_tool
    ]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or NO_ARGUMENTS_SCHEMA,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in allowed
    ]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if mode == "named" or request.parallel_tool_calls is False:
        return one
    return {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}


def tool_response_format(request: ChatCompletionRequest) -> dict[str, Any] | None:
    schema = call_schema(request)
    if schema is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema, "strict": True}}


def parse_tool_calls(text: str, request: ChatCompletionRequest) -> list[ToolCallOut] | None:
    """The calls in ``text`` when it is only tool-call JSON naming the request's functions."""
    if request.tool_mode == "none":
        return None
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.function.name for t in request.tools or ()}
    if request.tool_mode == "named":
        names = {request.named_tool}
    if not items or len(items) > MAX_PARALLEL_CALLS or (
        request.parallel_tool_calls is False and len(items) > 1
    ):
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(
            ToolCallOut(
                id=tool_call_id(),
                function=FunctionCallOut(name=item["name"], arguments=json.dumps(arguments)),
            )
        )
    return calls


def may_be_tool_call(text: str) -> bool:
    """Whether a stream's text so far could still turn out to be tool-call JSON."""
    stripped = text.lstrip()
    return not stripped or stripped[0] in "[{"


class ToolCallHold:
    """One choice of a chat answer with tools, on its way out: holds the text back while it
    may still be tool-call JSON (it starts with ``{`` or ``[``), then releases it as text, or
    at the choice's end turns it into a piece with ``tool_calls``. Text that cannot be a call
    passes as it comes. Constrained to a call (``required``, a named function), the text is
    a call from the start: its ``tool_calls`` deltas stream as it is decoded
    (``tool_call_stream``), in pieces with ``call_deltas``; a choice that ends before any
    call's name is whole (a whole answer, or one cut short) is held and parsed at its end."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.request = request
        self.holding = request.tool_mode != "none"
        self.constrained = request.tool_mode in ("required", "named")
        self.held: list[Piece] = []
        self.streamed = ToolCallStream() if self.constrained else None
        self.shown = False  # a piece of this choice went out (its role)

    def feed(self, piece: Piece) -> list[Piece]:
        if not self.holding:
            return [piece]
        self.held.append(piece)
        if self.streamed is not None and (self.streamed.started or piece.finish_reason is None):
            return self._stream_calls(piece)
        text = "".join(p.text for p in self.held)
        if not self.constrained and not may_be_tool_call(text):
            self.holding = False  # plain text: release what was held, then stream
            return [self._release(text, piece.finish_reason)]
        if piece.finish_reason is None:
            return self._first(piece)
        calls = None
        if piece.finish_reason == "stop" or not self.constrained:
            calls = parse_tool_calls(text, self.request)
        if calls:
            return [Piece(piece.index, "", "tool_calls", self._logprobs(), tool_calls=calls)]
        return [self._release(text, piece.finish_reason)]

    def _first(self, piece: Piece) -> list[Piece]:
        """Nothing to show yet: an empty first piece (the role), then nothing."""
        if self.shown:
            return []
        self.shown = True
        return [Piece(piece.index, echo=piece.echo)]

    def _stream_calls(self, piece: Piece) -> list[Piece]:
        """Constrained to a call: its deltas as they complete, with the log probabilities of
        the tokens so far; the last piece has the calls whole (what a session stores)."""
        assert self.streamed is not None
        deltas = self.streamed.feed(piece.text)
        if piece.finish_reason is None and not deltas:
            return self._first(piece)
        if piece.finish_reason is None:
            logprobs, self.held, self.shown = self._logprobs(), [], True
            return [Piece(piece.index, logprobs=logprobs, call_deltas=deltas)]
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in self.streamed.calls if c.name is not None
        ]
        finish = "tool_calls" if piece.finish_reason == "stop" else piece.finish_reason
        logprobs, self.held = self._logprobs(), []
        return [Piece(piece.index, "", finish, logprobs, tool_calls=calls, call_deltas=deltas)]

    def _release(self, text: str, finish_reason: str | None) -> Piece:
        index, logprobs = self.held[0].index, self._logprobs()
        self.held = []
        self.shown = True
        return Piece(index, text, finish_reason, logprobs)

    def _logprobs(self) -> list | None:
        if all(p.logprobs is None for p in self.held):
            return None
        return [lp for p in self.held for lp in (p.logprobs or ())]

__all__ = [
    "ToolCallHold",
    "tools_prompt",
    "llama_messages",
    "call_schema",
    "tool_response_format",
    "parse_tool_calls",
    "may_be_tool_call",
    "tool_call_id",
    "MAX_PARALLEL_CALLS",
]
