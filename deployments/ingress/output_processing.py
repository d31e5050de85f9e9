"""The output pipeline on the way out of the API: the LLMServer's answers in, processed ones out.

The ingress builds one ``ResponseProcessor`` at start from the ``output`` config section; every
plugin the section names is loaded then, so a broken one fails the deployment's start
(``engine.output.build``). Per request, ``open`` checks ``response_format`` and
``output_template`` (a 400 before any token is spent) and starts the pipeline's stream for
the tenant. Then:

- a whole answer is fed at once: the response carries the processed text and finish reason;
- a streamed answer (``ProcessedStream``) is fed chunk by chunk and each chunk carries what
  the pipeline releases (it holds text back up to a safe boundary, a sentence or a line, and
  never takes back what it sent); the engine's finish reason is not forwarded as it comes:
  the last chunk carries the pipeline's tail and finish reason. When the pipeline ends the
  output itself (``content_filter``: the tenant's policy blocked it; ``stop``: one of the
  pipeline's stop sequences) the stream ends there and the caller cancels the generation.

Processed answers carry the extension ``m_ai`` (format, validity, safety findings, quality
metrics; on a stream, in the last chunk), which the metrics layer will read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from cluster.config.output import OutputConfig
from cluster.errors import InvalidRequestError
from cluster.logging_setup import get_logger
from deployments.protocol import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    OutputReport,
    SamplingFields,
    StreamOptions,
)
from engine.decoding.structured import parse_response_format
from engine.output import (
    OutputProcessor,
    OutputRequest,
    OutputStream,
    ProcessedOutput,
    build_output_processor,
)

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


def with_usage(request: SamplingFields) -> SamplingFields:
    """The request as sent to the LLMServer when its output is processed: streamed with
    usage, whose completion tokens the pipeline's length check needs (``ProcessedStream``
    drops that chunk again unless the client asked for it)."""
    return request.model_copy(
        update={"stream": True, "stream_options": StreamOptions(include_usage=True)}
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
        self, response: ChatCompletionResponse, output: OutputStream | list[OutputStream] | None
    ) -> ChatCompletionResponse:
        """Each choice through its own stream; tool calls pass as they are (the report is the
        first text choice's)."""
        if output is None:
            return response
        outputs = output if isinstance(output, list) else [output]
        single = len(response.choices) == 1
        choices, report = [], None
        for choice, stream in zip(response.choices, outputs):
            if choice.message.tool_calls:
                choices.append(choice)
                continue
            tokens = response.usage.completion_tokens if single else None
            result = self._whole(stream, choice.message.content or "", choice.finish_reason, tokens)
            choices.append(choice.model_copy(update={
                "message": AssistantMessage(content=result.text),
                "finish_reason": result.finish_reason,
            }))
            report = report or output_report(result)
        return response.model_copy(update={"choices": choices, "m_ai": report})

    def completion_response(
        self, response: CompletionResponse, output: OutputStream | list[OutputStream] | None
    ) -> CompletionResponse:
        if output is None:
            return response
        outputs = output if isinstance(output, list) else [output]
        single = len(response.choices) == 1
        choices, report = [], None
        for choice, stream in zip(response.choices, outputs):
            tokens = response.usage.completion_tokens if response.usage and single else None
            result = self._whole(stream, choice.text, choice.finish_reason, tokens)
            choices.append(choice.model_copy(
                update={"text": result.text, "finish_reason": result.finish_reason}
            ))
            report = report or output_report(result)
        return response.model_copy(update={"choices": choices, "m_ai": report})

    @staticmethod
    def _whole(
        output: OutputStream, text: str, finish_reason: str | None, completion_tokens: int | None
    ) -> ProcessedOutput:
        output.feed(text)
        result = output.finish(finish_reason, completion_tokens)
        _log_result(output, result)
        return result


class ProcessedStream:
    """One streamed answer through the pipeline; iterate it for the chunks to send.

    With ``output=None`` (processing off) the chunks pass as they are. ``upstream_finished``
    tells the caller whether the upstream stream ended by itself (else: cancel it);
    ``complete`` whether the answer's last chunk was produced, and ``text`` is then the
    whole answer as the client got it (what a session stores).
    """

    def __init__(
        self,
        upstream: AsyncIterator[Chunk],
        output: OutputStream | list[OutputStream] | None,
        include_usage: bool,
    ) -> None:
        self.upstream = upstream
        self.outputs = output if isinstance(output, list) or output is None else [output]
        self.output = self.outputs[0] if self.outputs else None
        self.include_usage = include_usage
        self.upstream_finished = False
        self.complete = False
        self.result: ProcessedOutput | None = None
        self._passed: list[str] = []
        self.results: dict[int, ProcessedOutput] = {}
        self._chunks = self._passthrough() if output is None else self._processed()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else "".join(self._passed)

    async def _passthrough(self) -> AsyncIterator[Chunk]:
        async for chunk in self.upstream:
            for choice in chunk.choices:
                if choice.index == 0:
                    self._passed.append(_text_of(choice))
                    self.complete = self.complete or choice.finish_reason is not None
            yield chunk
        self.upstream_finished = True

    async def _processed(self) -> AsyncIterator[Chunk]:
        """Choice i through ``outputs[i]``; a choice that became tool calls passes as it is."""
        outputs = self.outputs
        assert outputs
        last: dict[int, Chunk] = {}  # per choice, its latest upstream chunk: ids for ours
        usage: Chunk | None = None
        reasons: dict[int, str | None] = {}
        first = dict.fromkeys(range(len(outputs)), True)
        tools: set[int] = set()
        ended: set[int] = set()  # choices the pipeline ended
        async for chunk in self.upstream:
            if not chunk.choices:  # the usage chunk, asked for by ``with_usage``
                usage = chunk
                continue
            choice = chunk.choices[0]
            index = choice.index
            if index in ended or index >= len(outputs):
                continue
            if _is_tool_chunk(choice) or index in tools:
                tools.add(index)
                yield chunk
                continue
            last[index] = chunk
            reasons[index] = choice.finish_reason or reasons.get(index)
            piece = outputs[index].feed(_text_of(choice))
            if piece.text or first[index] or choice.logprobs is not None:
                yield _rewrite(chunk, piece.text, None, first[index], logprobs=choice.logprobs)
                first[index] = False
            if piece.finish_reason is not None:
                ended.add(index)
                if len(ended | tools) >= len(outputs):
                    break  # the pipeline ended the output: the caller cancels the generation
        else:
            self.upstream_finished = True
        if not last:
            self.complete = bool(tools)
            return
        single = len(outputs) == 1
        tokens = usage.usage.completion_tokens if single and usage is not None and usage.usage else None
        for index in sorted(set(last) - tools):
            output = outputs[index]
            result = output.finish(reasons.get(index), tokens)
            self.results[index] = result
            _log_result(output, result)
            yield _rewrite(last[index], result.tail, result.finish_reason, first[index], output_report(result))
        self.result = self.results.get(0)
        self.complete = True
        if self.include_usage and usage is not None:
            yield usage


def _is_tool_chunk(choice: ChatChunkChoice | CompletionChoice) -> bool:
    return isinstance(choice, ChatChunkChoice) and (
        bool(choice.delta.tool_calls) or choice.finish_reason == "tool_calls"
    )


def _text_of(choice: ChatChunkChoice | CompletionChoice) -> str:
    if isinstance(choice, ChatChunkChoice):
        return choice.delta.content or ""
    return choice.text


def _rewrite(
    chunk: Chunk,
    text: str,
    finish_reason: str | None,
    first: bool,
    report: OutputReport | None = None,
    logprobs: Any = None,
) -> Chunk:
    """``chunk`` with its one choice carrying ``text`` and ``finish_reason``."""
    index = chunk.choices[0].index
    if isinstance(chunk, ChatCompletionChunk):
        delta = DeltaMessage(role="assistant" if first else None, content=text)
        choice: Any = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
    else:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
    return chunk.model_copy(update={"choices": [choice], "usage": None, "m_ai": report})


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


__all__ = ["ResponseProcessor", "ProcessedStream", "output_report", "with_usage"]
