"""From engine outputs to OpenAI responses and chunks: ``n`` choices, log probabilities in
OpenAI's shapes, and tool calls (parsed from the answer, streamed as ``tool_calls`` deltas).

A chat stream with tools holds a choice's text back while it may still be tool-call JSON
(it starts with ``{`` or ``[``); at the choice's end the JSON becomes ``tool_calls`` deltas
(per call: id, type and name, then the arguments) and ``finish_reason`` ``tool_calls``, or the
held text goes out as content. Text that cannot be a call streams as it comes. When decoding
is constrained to a call (``required``, a named function) the text is a call from the start:
its deltas stream as it is generated (``deployments.ingress.tool_call_stream``).
"""

from __future__ import annotations

import re
from typing import Any

from deployments.ingress.tool_call_stream import ToolCallStream
from deployments.ingress.tool_calls import may_be_tool_call, parse_tool_calls
from deployments.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
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
    """Each token's text and UTF-8 bytes, as OpenAI's logprobs show them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._plain = getattr(tokenizer, "plain_piece_texts", None) or {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is not None:
            return found
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


def _tool_call_deltas(calls: list) -> list[ToolCallDelta]:
    deltas = []
    for i, call in enumerate(calls):
        deltas.append(ToolCallDelta(index=i, id=call.id, type="function",
                                    function=FunctionCallDelta(name=call.function.name, arguments="")))
        deltas.append(ToolCallDelta(index=i, function=FunctionCallDelta(arguments=call.function.arguments)))
    return deltas


class _ChatChoiceStream:
    """One choice of a streamed chat completion."""

    def __init__(self, index: int, request: ChatCompletionRequest | None, texts: TokenTexts | None) -> None:
        self.index = index
        self.request = request
        self.texts = texts
        self.sent_role = False
        self.token_ids = 0
        constrained = request is not None and request.tool_mode in ("required", "named")
        self.holding = request is not None and request.tool_mode != "none"
        self.constrained = constrained
        self.held = ""
        self.held_logprobs: list[TokenLogprob] = []
        self.streamed = ToolCallStream() if constrained else None

    def choices(self, out: RequestOutput) -> list[ChatChunkChoice]:
        check_output(out)
        self.token_ids += len(out.token_ids)
        text, logprobs = out.text, out.logprobs
        if self.streamed is not None:
            return self._stream_calls(out)
        if self.holding:
            self.held += text
            self.held_logprobs += logprobs or []
            if not self.constrained and not may_be_tool_call(self.held):
                self.holding = False  # plain text: release what was held, then stream
                text, self.held = self.held, ""
                logprobs = self.held_logprobs if out.logprobs is not None else None
                self.held_logprobs = []
            elif out.finish_reason is None:
                return [] if self.sent_role else [self._choice(DeltaMessage(role="assistant", content=""), None, None)]
            else:
                return self._finish_held(out)
        if not text and out.finish_reason is None and self.sent_role and not logprobs:
            return []
        delta = DeltaMessage(role=None if self.sent_role else "assistant", content=text)
        lp = self.texts.chat(logprobs) if self.texts is not None and logprobs is not None else None
        return [self._choice(delta, out.finish_reason, lp)]

    def _stream_calls(self, out: RequestOutput) -> list[ChatChunkChoice]:
        """Constrained to a call: its deltas as they complete (logprobs of the tokens so far
        with each); a choice cut short before any call's name is whole ends as held text."""
        assert self.streamed is not None
        self.held += out.text
        self.held_logprobs += out.logprobs or []
        deltas = self.streamed.feed(out.text)
        if out.finish_reason is not None and not self.streamed.started:
            return self._finish_held(out)
        chunks = []
        if deltas or (out.finish_reason is not None and self.held_logprobs):
            lp = self.texts.chat(self.held_logprobs) if self.texts is not None and out.logprobs is not None else None
            self.held_logprobs = []
            role = None if self.sent_role else "assistant"
            chunks.append(self._choice(DeltaMessage(role=role, tool_calls=deltas or None), None, lp))
        if out.finish_reason is not None:
            finish = "tool_calls" if out.finish_reason == "stop" else out.finish_reason
            chunks.append(self._choice(DeltaMessage(), finish, None))
        elif not chunks and not self.sent_role:
            chunks.append(self._choice(DeltaMessage(role="assistant", content=""), None, None))
        return chunks

    def _finish_held(self, out: RequestOutput) -> list[ChatChunkChoice]:
        calls = parse_tool_calls(self.held, self.request) if out.finish_reason == "stop" or not self.constrained else None
        lp = self.texts.chat(self.held_logprobs) if self.texts is not None and out.logprobs is not None else None
        if calls:
            chunks = [self._choice(DeltaMessage(role=None if self.sent_role else "assistant",
                                                tool_calls=_tool_call_deltas(calls)), None, lp)]
            return chunks + [self._choice(DeltaMessage(), "tool_calls", None)]
        delta = DeltaMessage(role=None if self.sent_role else "assistant", content=self.held)
        return [self._choice(delta, out.finish_reason, lp)]

    def _choice(self, delta: DeltaMessage, finish: str | None, lp: ChoiceLogprobs | None) -> ChatChunkChoice:
        self.sent_role = True
        return ChatChunkChoice(index=self.index, delta=delta, finish_reason=finish, logprobs=lp)


class ChatChunks:
    """Builds the chunks of one streamed chat completion (``n`` choices)."""

    def __init__(
        self, model: str, prompt_tokens: int, include_usage: bool,
        request: ChatCompletionRequest | None = None, texts: TokenTexts | None = None,
    ) -> None:
        self.id = completion_id("chatcmpl")
        self.created = now()
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        n = request.n if request is not None else 1
        self.streams = [_ChatChoiceStream(i, request, texts) for i in range(n)]

    def chunk(self, out: RequestOutput, index: int = 0) -> ChatCompletionChunk | None:
        """The chunk for ``out`` of choice ``index`` (None when it carries nothing to see)."""
        choices = self.streams[index].choices(out)
        if not choices:
            return None
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)

    def usage_chunk(self, lasts: list[RequestOutput] | RequestOutput) -> ChatCompletionChunk:
        lasts = lasts if isinstance(lasts, list) else [lasts]
        tokens = sum(last.completion_tokens or s.token_ids for last, s in zip(lasts, self.streams))
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[],
            usage=Usage.of(self.prompt_tokens, tokens),
        )


class CompletionChunks:
    """Builds the chunks of one streamed text completion (``n`` choices)."""

    def __init__(
        self, model: str, prompt_tokens: int, include_usage: bool,
        request: CompletionRequest | None = None, texts: TokenTexts | None = None, echo: str = "",
    ) -> None:
        self.id = completion_id("cmpl")
        self.created = now()
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        n = request.n if request is not None else 1
        self.texts = texts
        self.token_ids = [0] * n
        self.offsets = [len(echo)] * n
        self.echo = [echo] * n

    def chunk(self, out: RequestOutput, index: int = 0) -> CompletionResponse | None:
        check_output(out)
        self.token_ids[index] += len(out.token_ids)
        text = self.echo[index] + out.text
        self.echo[index] = ""
        if not text and out.finish_reason is None and not out.logprobs:
            return None
        lp = None
        if self.texts is not None and out.logprobs is not None:
            lp = self.texts.completion(out.logprobs, self.offsets[index])
        self.offsets[index] += len(out.text)
        choice = CompletionChoice(index=index, text=text, finish_reason=out.finish_reason, logprobs=lp)
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, lasts: list[RequestOutput] | RequestOutput) -> CompletionResponse:
        lasts = lasts if isinstance(lasts, list) else [lasts]
        tokens = sum(last.completion_tokens or n for last, n in zip(lasts, self.token_ids))
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[],
            usage=Usage.of(self.prompt_tokens, tokens),
        )


def chat_response(
    outs: RequestOutput | list[RequestOutput], model: str, prompt_tokens: int,
    request: ChatCompletionRequest | None = None, texts: TokenTexts | None = None,
) -> ChatCompletionResponse:
    """The whole answer from each choice's merged output."""
    outs = outs if isinstance(outs, list) else [outs]
    choices = []
    for index, out in enumerate(outs):
        check_output(out)
        lp = texts.chat(out.logprobs) if texts is not None else None
        calls = None
        if request is not None and request.tool_mode != "none":
            constrained = request.tool_mode in ("required", "named")
            if out.finish_reason == "stop" or not constrained:
                calls = parse_tool_calls(out.text, request)
        if calls:
            message = AssistantMessage(content=None, tool_calls=calls)
            choices.append(ChatChoice(index=index, message=message, finish_reason="tool_calls", logprobs=lp))
        else:
            choices.append(ChatChoice(index=index, message=AssistantMessage(content=out.text),
                                      finish_reason=out.finish_reason, logprobs=lp))
    tokens = sum(out.completion_tokens or len(out.token_ids) for out in outs)
    return ChatCompletionResponse(
        id=completion_id("chatcmpl"), created=now(), model=model, choices=choices,
        usage=Usage.of(prompt_tokens, tokens),
    )


def completion_response(
    outs: RequestOutput | list[RequestOutput], model: str, prompt_tokens: int,
    texts: TokenTexts | None = None, echo: str = "",
) -> CompletionResponse:
    outs = outs if isinstance(outs, list) else [outs]
    choices = []
    for index, out in enumerate(outs):
        check_output(out)
        lp = texts.completion(out.logprobs, len(echo)) if texts is not None else None
        choices.append(CompletionChoice(index=index, text=echo + out.text,
                                        finish_reason=out.finish_reason, logprobs=lp))
    tokens = sum(out.completion_tokens or len(out.token_ids) for out in outs)
    return CompletionResponse(
        id=completion_id("cmpl"), created=now(), model=model, choices=choices,
        usage=Usage.of(prompt_tokens, tokens),
    )


__all__ = [
    "TokenTexts", "ChatChunks", "CompletionChunks", "chat_response", "completion_response",
    "check_output",
]
