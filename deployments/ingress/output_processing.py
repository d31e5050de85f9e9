"""The output pipeline on the way out of the API: the engine's deltas in, OpenAI objects out.

The ingress builds one ``ResponseProcessor`` at start from the ``output`` config section; every
plugin the section names is loaded then, so a broken one fails the deployment's start
(``engine.output.build``). Per request, ``open`` checks ``response_format`` and
``output_template`` (a 400 before any token is spent) and starts the pipeline's stream for
the tenant. Then:

- the pipeline works on text: ``AnswerShaper`` takes the LLMServer's deltas
  (``deployments.messages.ChoiceDelta``), parses tool calls out of a chat's text first
  (those pass the pipeline as they are), and feeds each choice's text to its own stream;
- a streamed answer (``ProcessedStream``) carries in each chunk what the pipeline releases
  (it holds text back up to a safe boundary, a sentence or a line, and never takes back what
  it sent); the engine's finish reason is not forwarded as it comes: the last chunk carries
  the pipeline's tail and finish reason. When the pipeline ends the output itself
  (``content_filter``: the tenant's policy blocked it; ``stop``: one of the pipeline's stop
  sequences) the stream ends there, and closing it cancels the generation;
- a whole answer is the same, fed one final delta per choice;
- the OpenAI objects are built once, after the pipeline (``deployments.ingress.openai_api.outputs``).

Processed answers carry the extension ``m_ai`` (format, validity, safety findings, quality
metrics; on a stream, in the last chunk), which the metrics layer will read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

from cluster.config.output import OutputConfig
from cluster.errors import InvalidRequestError
from cluster.logging_setup import get_logger
from deployments.ingress.openai_api.outputs import (
    ChatChunks,
    CompletionChunks,
    Piece,
    TokenTexts,
    chat_response,
    check_output,
    completion_response,
    whole,
)
from deployments.ingress.openai_api.tool_calls import ToolCallHold
from deployments.messages import ChoiceDelta
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    OutputReport,
    SamplingFields,
    Usage,
)
from deployments.protocol_tools import ToolCallOut
from engine.decoding.structured import parse_response_format
from engine.output import (
    OutputProcessor,
    OutputRequest,
    OutputStream,
    ProcessedOutput,
    build_output_processor,
)
from engine.types import RequestOutput

log = get_logger("deployments.ingress.output_processing")

Chunk = ChatCompletionChunk | CompletionResponse


def output_report(result: ProcessedOutput) -> OutputReport:
    return OutputReport(
        format=result.format,
        valid=result.valid,
        errors=list(result.errors),
        findings=[asdict(f) for f in result.findings],
        metrics=result.metrics.as_dict() if result.metrics is not None else None,
        summary=result.summary,
    )


class ResponseProcessor:
    """The output pipeline of one ingress replica (see the module docstring)."""

    def __init__(self, config: OutputConfig | None = None) -> None:
        config = config or OutputConfig()
        self.processor: OutputProcessor | None = (
            build_output_processor(config) if config.enabled else None
        )

    def open(self, request: SamplingFields, tenant: str) -> OutputStream | None:
        """Check the request's output fields and start its stream (None when processing is
        off). ``InvalidRequestError`` for a malformed ``response_format`` or an unknown
        ``output_template``."""
        parse_response_format(request.response_format)
        if self.processor is None:
            if request.output_template is not None:
                raise InvalidRequestError(
                    f"output_template={request.output_template!r} needs output processing, "
                    "which is off on this server (output.enabled=false); leave it out",
                    param="output_template",
                )
            return None
        output_request = OutputRequest(
            tenant=tenant,
            response_format=request.response_format,
            max_tokens=request.max_tokens,
            # the engine has cut at the stop string; kept, it must not be cut again here
            stop=() if request.include_stop_str_in_output else tuple(request.stop or ()),
            template=request.output_template,
        )
        try:
            return self.processor.stream(output_request)
        except InvalidRequestError as exc:
            if exc.param != "template":
                raise
            raise InvalidRequestError(
                f"output_template: {exc.message}", param="output_template"
            ) from None

    def open_choices(self, request: SamplingFields, tenant: str) -> list[OutputStream] | None:
        """One pipeline stream per choice (``n``), or None when processing is off."""
        first = self.open(request, tenant)
        if first is None:
            return None
        return [first] + [self.open(request, tenant) for _ in range(1, request.n)]

    def chat_response(
        self,
        request: ChatCompletionRequest,
        finals: list[ChoiceDelta],
        output: OutputStream | list[OutputStream] | None,
    ) -> tuple[ChatCompletionResponse, dict[str, Any]]:
        """The whole chat answer from each choice's final delta, processed, built once; and
        what a session stores of it (``AnswerShaper.stored``)."""
        choices, shaper = whole_answer(request, finals, output)
        return chat_response(choices, request.model, shaper.usage(), shaper.texts), shaper.stored()

    def completion_response(
        self,
        request: CompletionRequest,
        finals: list[ChoiceDelta],
        output: OutputStream | list[OutputStream] | None,
    ) -> CompletionResponse:
        choices, shaper = whole_answer(request, finals, output)
        return completion_response(choices, request.model, shaper.usage(), shaper.texts)


class AnswerShaper:
    """One answer's choices from the engine's deltas to the pieces a client sees: tool calls
    parsed out of a chat's text (``ToolCallHold``), then choice i's text through
    ``outputs[i]`` (a choice that became tool calls passes as it is). Streamed and whole
    answers go through it alike, so both are shaped once and the same way.

    ``cut`` tells that the pipeline ended every choice itself (stop reading the generation);
    ``complete`` that choice 0's last piece was produced, and ``stored()`` is then what a
    session stores of it (its text as the client got it, or its tool calls as the JSON the
    model wrote, with their typed items). ``texts`` learns the token texts the replica sends for log probabilities.
    """

    def __init__(
        self, request: SamplingFields, outputs: OutputStream | list[OutputStream] | None
    ) -> None:
        self.outputs = outputs if isinstance(outputs, list) or outputs is None else [outputs]
        self.texts = TokenTexts(None)
        n = request.n or 1
        self.holds = (
            [ToolCallHold(request) for _ in range(n)]
            if isinstance(request, ChatCompletionRequest) and request.tool_mode != "none"
            else None
        )
        self.lasts: list[RequestOutput | None] = [None] * n
        self.token_ids = [0] * n
        self.first = [True] * n  # nothing of the choice shown yet (its role, its echo)
        self.tools: set[int] = set()
        self.ended: set[int] = set()  # choices the pipeline ended
        self.reasons: dict[int, str | None] = {}
        self.echo: dict[int, str] = {}
        self.cut = False
        self.complete = False
        self.result: ProcessedOutput | None = None
        self._passed: list[str] = []
        self._calls: list[ToolCallOut] | None = None

    @property
    def upstream_finished(self) -> bool:
        return all(last is not None and last.finished for last in self.lasts)

    @property
    def text(self) -> str:
        return self.stored()["content"]

    def stored(self) -> dict[str, Any]:
        """Choice 0 as a session keeps it: its text, or its tool calls as the JSON the model
        wrote with their typed items (``protocol.ChatMessage.stored``)."""
        if self._calls:
            calls = [c.model_dump() for c in self._calls]
            return ChatMessage.model_validate(
                {"role": "assistant", "content": None, "tool_calls": calls}
            ).stored()
        text = self.result.text if self.result is not None else "".join(self._passed)
        return {"role": "assistant", "content": text}

    def usage(self) -> Usage:
        prompt = next((last.prompt_tokens for last in self.lasts if last is not None), 0)
        tokens = sum(
            (last.completion_tokens if last is not None else 0) or n
            for last, n in zip(self.lasts, self.token_ids)
        )
        return Usage.of(prompt, tokens)

    def feed(self, delta: ChoiceDelta) -> list[Piece]:
        out, index = delta.output, delta.index
        check_output(out)
        self.texts.learn(delta.token_texts)
        self.lasts[index] = out
        self.token_ids[index] += len(out.token_ids)
        piece = Piece(index, out.text, out.finish_reason, out.logprobs, echo=delta.echo)
        pieces = self.holds[index].feed(piece) if self.holds is not None else [piece]
        if self.outputs is None:
            for p in pieces:
                self._note(p)
            return pieces
        return [shown for p in pieces for shown in self._processed(p)]

    def _note(self, piece: Piece) -> None:
        if piece.index != 0:
            return
        self._passed.append(piece.text)
        self._calls = piece.tool_calls or self._calls
        self.complete = self.complete or piece.finish_reason is not None

    def _processed(self, piece: Piece) -> list[Piece]:
        index, outputs = piece.index, self.outputs
        assert outputs is not None
        if index in self.ended:
            return []
        if piece.tool_calls or piece.call_deltas is not None:
            self.tools.add(index)
            self._note(piece)
            return [piece]
        self.reasons[index] = piece.finish_reason or self.reasons.get(index)
        self.echo.setdefault(index, piece.echo)
        released = outputs[index].feed(piece.text)
        shown = []
        if released.text or self.first[index] or piece.logprobs is not None:
            shown.append(replace(piece, text=released.text, finish_reason=None))
            self.first[index] = False
        if released.finish_reason is not None:
            self.ended.add(index)
            self.cut = len(self.ended | self.tools) >= len(outputs)
        return shown

    def finish(self) -> list[Piece]:
        """The pipeline's tail of each text choice, with its finish reason and report."""
        if self.outputs is None:
            return []
        texts = sorted(set(self.reasons) - self.tools)
        if not texts:
            self.complete = bool(self.tools)
            return []
        single = len(self.outputs) == 1
        last = self.lasts[0]
        tokens = last.completion_tokens if single and last is not None and last.finished else None
        tails = []
        for index in texts:
            output = self.outputs[index]
            result = output.finish(self.reasons.get(index), tokens or None)
            _log_result(output, result)
            if index == 0:
                self.result = result
            echo = self.echo.get(index, "") if self.first[index] else ""
            tails.append(Piece(index, result.tail, result.finish_reason, report=output_report(result), echo=echo))
        self.complete = True
        return tails


class ProcessedStream:
    """One streamed answer: the LLMServer's deltas in (``upstream``), OpenAI chunks out, built
    once, after the output pipeline (``AnswerShaper``); the usage chunk last, when
    ``include_usage`` and the generation ran to its end. When the pipeline ends the output
    itself the stream ends there; closing this stream (``aclose``: the client left, or the
    pipeline ended it) closes the upstream, which cancels the generation."""

    def __init__(
        self,
        upstream: AsyncIterator[ChoiceDelta],
        output: OutputStream | list[OutputStream] | None,
        include_usage: bool,
        request: ChatCompletionRequest | CompletionRequest,
    ) -> None:
        self.upstream = upstream
        self.include_usage = include_usage
        self.shaper = AnswerShaper(request, output)
        chat = isinstance(request, ChatCompletionRequest)
        self.builder = (ChatChunks if chat else CompletionChunks)(
            request.model, request.n or 1, self.shaper.texts
        )
        self._chunks = self._run()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()
        close = getattr(self.upstream, "aclose", None)
        if close is not None:
            await close()

    @property
    def upstream_finished(self) -> bool:
        return self.shaper.upstream_finished

    @property
    def complete(self) -> bool:
        return self.shaper.complete

    @property
    def text(self) -> str:
        return self.shaper.text

    def stored(self) -> dict[str, Any]:
        return self.shaper.stored()

    async def _run(self) -> AsyncIterator[Chunk]:
        shaper, builder = self.shaper, self.builder
        async for delta in self.upstream:
            for piece in shaper.feed(delta):
                chunk = builder.chunk(piece)
                if chunk is not None:
                    yield chunk
            if shaper.cut:
                break  # the pipeline ended the output: closing the upstream cancels the rest
        for piece in shaper.finish():
            chunk = builder.chunk(piece)
            if chunk is not None:
                yield chunk
        if self.include_usage and shaper.upstream_finished:
            usage = shaper.usage()
            yield builder.usage_chunk(usage.prompt_tokens, usage.completion_tokens)


def whole_answer(
    request: SamplingFields, finals: list[ChoiceDelta], output: OutputStream | list[OutputStream] | None
) -> tuple[list[Piece], AnswerShaper]:
    """Each choice of a whole answer folded into one piece, shaped as a stream of its final
    delta would be."""
    shaper = AnswerShaper(request, output)
    pieces = [p for delta in finals for p in shaper.feed(delta)] + shaper.finish()
    by_choice: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_choice.setdefault(piece.index, []).append(piece)
    return [whole(by_choice[i]) for i in sorted(by_choice)], shaper


def _log_result(output: OutputStream, result: ProcessedOutput) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    log.debug(
        "output processed",
        extra={
            "tenant": output.request.tenant,
            "finish_reason": result.finish_reason,
            "format": result.format,
            "valid": result.valid,
            "errors": "; ".join(result.errors)[:500],
            "findings": ",".join(f"{f.category}:{f.action}" for f in result.findings),
            **(result.metrics.as_dict() if result.metrics is not None else {}),
        },
    )


__all__ = ["AnswerShaper", "ResponseProcessor", "ProcessedStream", "output_report", "whole_answer"]
