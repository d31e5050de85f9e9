"""The OpenAI objects of an answer, built once: chunks and whole responses from ``Piece``s.

A ``Piece`` is one step of one choice as the client will see it, after the output pipeline
(``deployments.ingress.output_processing``): text, or the choice's tool calls (parsed out of
the stream by ``deployments.ingress.openai_api.tool_calls.ToolCallHold``), log probabilities, and on
the last one the finish reason and the pipeline's report. The builders here turn pieces into
``n``-choice chunks (the role on a choice's first, tool calls as ``tool_calls`` deltas: per
call id, type and name, then the arguments; ``finish_reason`` ``tool_calls``), the usage
chunk, and whole responses, with log probabilities in OpenAI's shapes (``TokenTexts``).
When decoding is constrained to a call (``required``, a named function) the calls stream as
they are decoded: pieces with ``call_deltas`` carry their ``tool_calls`` deltas (per call:
index, id, type, name and empty arguments first, then argument fragments;
``deployments.ingress.openai_api.tool_call_stream``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deployments.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    OutputReport,
    Usage,
    completion_id,
    now,
)
from deployments.protocol_tools import (
    ChoiceLogprobs,
    CompletionLogprobs,
    FunctionCallDelta,
    TokenLogprobEntry,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
)
from engine.types import RequestOutput, TokenLogprob, output_failure

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def check_output(out: RequestOutput) -> None:
    """Raise for an output that ended in failure rather than in text."""
    failure = output_failure(out)
    if failure is not None:
        raise failure


class TokenTexts:
    """Each token's text and UTF-8 bytes, as OpenAI's logprobs show them. The replica, which
    has the tokenizer, sends the ``table`` of a delta's tokens with it; the ingress builds
    the objects from the tables it has learnt (``TokenTexts(None)``, ``learn``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._plain = getattr(tokenizer, "plain_piece_texts", None) or {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def table(self, logprobs: list[TokenLogprob]) -> dict[int, tuple[str, list[int]]]:
        """Text and bytes of every token id in ``logprobs`` (sampled and top alternatives)."""
        ids = {lp.token_id for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top}
        return {t: self.of(t) for t in ids}

    def learn(self, table: dict[int, tuple[str, list[int]]] | None) -> None:
        if table:
            self._cache.update(table)

    def of(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is not None:
            return found
        if self.tokenizer is None:  # not in any table the replica sent: nothing to show
            return "", []
        text = self._plain.get(token_id)
        raw: list[int] | None = None
        if text is None:
            piece = getattr(self.tokenizer, "piece_text", None)
            name = piece(token_id) if piece is not None else None
            match = _BYTE_PIECE.match(name) if isinstance(name, str) else None
            if match:  # a byte-fallback token: its byte, shown as vLLM does when not UTF-8
                byte = int(match.group(1), 16)
                raw = [byte]
                text = chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        found = (text, raw if raw is not None else list(text.encode("utf-8")))
        self._cache[token_id] = found
        return found

    def entry(self, lp: TokenLogprob) -> TokenLogprobEntry:
        text, raw = self.of(lp.token_id)
        top = []
        for token_id, value in lp.top:
            t, b = self.of(token_id)
            top.append(TopLogprob(token=t, logprob=value, bytes=b))
        return TokenLogprobEntry(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)

    def chat(self, entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if entries is None:
            return None
        return ChoiceLogprobs(content=[self.entry(lp) for lp in entries])

    def completion(self, entries: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
        if entries is None:
            return None
        out = CompletionLogprobs()
        for lp in entries:
            text, _ = self.of(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.of(t)[0]: v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


@dataclass
class Piece:
    """One step of choice ``index`` as the client will see it (see the module docstring).
    ``echo``: a completion's prompt, shown before the choice's text (``echo``)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallOut] | None = None
    report: OutputReport | None = None
    echo: str = ""
    call_deltas: list[ToolCallDelta] | None = None  # streamed calls: this step's deltas


def _tool_call_deltas(calls: list) -> list[ToolCallDelta]:
    deltas = []
    for i, call in enumerate(calls):
        deltas.append(ToolCallDelta(index=i, id=call.id, type="function",
                                    function=FunctionCallDelta(name=call.function.name, arguments="")))
        deltas.append(ToolCallDelta(index=i, function=FunctionCallDelta(arguments=call.function.arguments)))
    return deltas


class ChatChunks:
    """Builds the chunks of one streamed chat completion (``n`` choices) from pieces."""

    def __init__(self, model: str, n: int = 1, texts: TokenTexts | None = None) -> None:
        self.id = completion_id("chatcmpl")
        self.created = now()
        self.model = model
        self.texts = texts
        self.sent_role = [False] * n

    def chunk(self, piece: Piece) -> ChatCompletionChunk | None:
        """The chunk for ``piece`` (None when it carries nothing to see)."""
        index, sent = piece.index, self.sent_role[piece.index]
        shows = piece.tool_calls or piece.call_deltas or piece.text or piece.logprobs
        if not shows and piece.finish_reason is None and sent:
            return None
        self.sent_role[index] = True
        role = None if sent else "assistant"
        lp = self.texts.chat(piece.logprobs) if self.texts is not None else None
        if piece.call_deltas is not None:  # the calls streamed: this step's deltas, no whole calls
            choices = []
            if piece.call_deltas or piece.logprobs or not sent:
                delta = DeltaMessage(role=role, tool_calls=piece.call_deltas or None)
                choices.append(ChatChunkChoice(index=index, delta=delta, finish_reason=None, logprobs=lp))
            if piece.finish_reason is not None:
                choices.append(ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=piece.finish_reason))
            if not choices:
                return None
        elif piece.tool_calls:
            delta = DeltaMessage(role=role, tool_calls=_tool_call_deltas(piece.tool_calls))
            choices = [
                ChatChunkChoice(index=index, delta=delta, finish_reason=None, logprobs=lp),
                ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason="tool_calls"),
            ]
        else:
            delta = DeltaMessage(role=role, content=piece.text)
            choices = [ChatChunkChoice(index=index, delta=delta, finish_reason=piece.finish_reason, logprobs=lp)]
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, m_ai=piece.report
        )

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[],
            usage=Usage.of(prompt_tokens, completion_tokens),
        )


class CompletionChunks:
    """Builds the chunks of one streamed text completion (``n`` choices) from pieces."""

    def __init__(self, model: str, n: int = 1, texts: TokenTexts | None = None) -> None:
        self.id = completion_id("cmpl")
        self.created = now()
        self.model = model
        self.texts = texts
        self.offsets = [0] * n

    def chunk(self, piece: Piece) -> CompletionResponse | None:
        index = piece.index
        self.offsets[index] += len(piece.echo)
        text = piece.echo + piece.text
        if not text and piece.finish_reason is None and not piece.logprobs:
            return None
        lp = None
        if self.texts is not None and piece.logprobs is not None:
            lp = self.texts.completion(piece.logprobs, self.offsets[index])
        self.offsets[index] += len(piece.text)
        choice = CompletionChoice(index=index, text=text, finish_reason=piece.finish_reason, logprobs=lp)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], m_ai=piece.report
        )

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[],
            usage=Usage.of(prompt_tokens, completion_tokens),
        )


def whole(pieces: list[Piece]) -> Piece:
    """One choice's pieces folded into one (what a whole response shows of it)."""
    last = pieces[-1]
    logprobs = None
    if any(p.logprobs is not None for p in pieces):
        logprobs = [lp for p in pieces for lp in (p.logprobs or ())]
    calls = next((p.tool_calls for p in pieces if p.tool_calls), None)
    report = next((p.report for p in reversed(pieces) if p.report is not None), None)
    return Piece(
        last.index, "".join(p.text for p in pieces), last.finish_reason, logprobs, calls, report,
        "".join(p.echo for p in pieces),
    )


def chat_response(
    choices: list[Piece], model: str, usage: Usage, texts: TokenTexts | None = None
) -> ChatCompletionResponse:
    """The whole answer from each choice's folded piece (the report is the first text
    choice's)."""
    out = []
    for piece in choices:
        lp = texts.chat(piece.logprobs) if texts is not None else None
        if piece.tool_calls:
            message = AssistantMessage(content=None, tool_calls=piece.tool_calls)
            out.append(ChatChoice(index=piece.index, message=message, finish_reason="tool_calls", logprobs=lp))
        else:
            out.append(ChatChoice(index=piece.index, message=AssistantMessage(content=piece.text),
                                  finish_reason=piece.finish_reason, logprobs=lp))
    return ChatCompletionResponse(
        id=completion_id("chatcmpl"), created=now(), model=model, choices=out, usage=usage,
        m_ai=_report(choices),
    )


def completion_response(
    choices: list[Piece], model: str, usage: Usage, texts: TokenTexts | None = None
) -> CompletionResponse:
    out = []
    for piece in choices:
        lp = texts.completion(piece.logprobs, len(piece.echo)) if texts is not None else None
        out.append(CompletionChoice(index=piece.index, text=piece.echo + piece.text,
                                    finish_reason=piece.finish_reason, logprobs=lp))
    return CompletionResponse(
        id=completion_id("cmpl"), created=now(), model=model, choices=out, usage=usage,
        m_ai=_report(choices),
    )


def _report(choices: list[Piece]) -> OutputReport | None:
    return next((p.report for p in choices if p.report is not None), None)


__all__ = [
    "Piece", "TokenTexts", "ChatChunks", "CompletionChunks", "chat_response",
    "completion_response", "check_output", "whole",
]
