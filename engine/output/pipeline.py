"""The output pipeline: sanitize -> detect_format -> parse -> validate -> post_process.

    processor = build_output_processor(config.output)          # engine/output/build.py
    result = processor.process(RawOutput(text, "stop", completion_tokens=42,
                                         request=OutputRequest(tenant="acme")))

    stream = processor.stream(OutputRequest(tenant="acme", response_format=rf))
    for delta in engine_deltas:
        piece = stream.feed(delta.text)        # send piece.text; it is never taken back
        if piece.finish_reason:                # content_filter or a stop sequence:
            break                              # cancel the generation
    result = stream.finish(delta.finish_reason, delta.completion_tokens)
    # send result.tail, then report result.finish_reason

On the stream, text flows: sanitize (holds back what a later delta could change) -> the
segmenter (safe boundaries: lines and sentences) -> content safety on each segment (the
tenant's policy: allow, redact, block) -> the post-process stage's segment transform
(deduplication, markdown lists). At the end: the transform's tail (a closing code fence),
then format detection, parsing and validation of the whole text, summary and metrics, and
the optional template. ``process(raw)`` is the same machine fed the whole text at once,
and every stream-time step is independent of how the text is split, so both give the same
result (tests/unit/engine/output/test_output_pipeline.py checks it on random splits).

Content safety is not a replaceable stage: replacing ``sanitize`` or ``post_process`` with
a plugin never turns the tenant's policy off. Its checks are plugins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.errors import MAIError
from engine.decoding.structured import parse_response_format
from engine.output.formats import (
    FormatDetector,
    FormatParser,
    FormatRegistry,
    FormatValidator,
    code_blocks,
)
from engine.output.postprocess import PostProcessor
from engine.output.safety import SafetyGuard, SafetyPolicy
from engine.output.sanitize import Sanitizer
from engine.output.segments import Segmenter
from engine.output.templates import TemplateRenderer
from engine.output.types import (
    DetectFormatStage,
    Finding,
    OutputFacts,
    OutputRequest,
    ParseStage,
    PostProcessStage,
    ProcessedOutput,
    RawOutput,
    SanitizeStage,
    StreamDelta,
    ValidateStage,
)


@dataclass(frozen=True)
class OutputStages:
    """The five replaceable stages."""

    sanitize: SanitizeStage
    detect_format: DetectFormatStage
    parse: ParseStage
    validate: ValidateStage
    post_process: PostProcessStage

    @classmethod
    def defaults(cls, formats: FormatRegistry) -> OutputStages:
        return cls(
            Sanitizer(),
            FormatDetector(formats),
            FormatParser(formats),
            FormatValidator(formats),
            PostProcessor(),
        )


class OutputProcessor:
    """Processes model output for every request of a server (build it once at start)."""

    def __init__(
        self,
        stages: OutputStages | None = None,
        *,
        formats: FormatRegistry | None = None,
        guards: Mapping[str, SafetyGuard] | None = None,
        default_guard: SafetyGuard | None = None,
        templates: TemplateRenderer | None = None,
        segment_chars: int = 240,
        hard_segment_chars: int = 2000,
    ) -> None:
        self.formats = formats or FormatRegistry()
        self.stages = stages or OutputStages.defaults(self.formats)
        self.guards = dict(guards or {})
        self.default_guard = default_guard or SafetyGuard((), SafetyPolicy({}))
        self.templates = templates or TemplateRenderer({})
        self.segment_chars = segment_chars
        self.hard_segment_chars = hard_segment_chars

    def guard_for(self, tenant: str) -> SafetyGuard:
        return self.guards.get(tenant, self.default_guard)

    def stream(self, request: OutputRequest) -> OutputStream:
        """Start processing one request's stream (raises ``InvalidRequestError`` for an
        unknown template or format)."""
        return OutputStream(self, request)

    def process(self, raw: RawOutput) -> ProcessedOutput:
        """The whole output at once; equal to streaming it in any split."""
        stream = self.stream(raw.request)
        stream.feed(raw.text)
        return stream.finish(raw.finish_reason, raw.completion_tokens)


class OutputStream:
    """One request's output on its way to the client (see the module docstring)."""

    def __init__(self, processor: OutputProcessor, request: OutputRequest) -> None:
        stages = processor.stages
        self._processor = processor
        self.request = request
        if request.template is not None:
            processor.templates.check(request.template)
        if request.format is not None:
            processor.formats.get(request.format)  # InvalidRequestError when unknown
        self._sanitize = stages.sanitize.open(request)
        self._guard = processor.guard_for(request.tenant)
        self._post = stages.post_process.open(request, self._prose(processor, request))
        changes = getattr(stages.post_process, "changes_text", True)
        self._segmenter = (
            Segmenter(processor.segment_chars, processor.hard_segment_chars)
            if self._guard.active or changes
            else None
        )
        self._hold_all = request.template is not None
        self._sent: list[str] = []  # what feed returned
        self._held: list[str] = []  # processed but not yet returned (template requests)
        self._offset = 0  # sanitized characters before the next segment (finding offsets)
        self._findings: list[Finding] = []
        self._raw_chars = 0
        # set when the pipeline itself ended the output: content_filter, stop or length
        self._ended: str | None = None
        self._result: ProcessedOutput | None = None

    @staticmethod
    def _prose(processor: OutputProcessor, request: OutputRequest) -> bool | None:
        if request.format is not None:
            return processor.formats.get(request.format).prose
        fmt = parse_response_format(request.response_format)
        if fmt is not None and fmt.constrained:
            return False
        return None

    # -- stream -----------------------------------------------------------------------------

    def feed(self, delta: str) -> StreamDelta:
        """Process one delta of model text; returns what may be sent now."""
        if self._ended or self._result is not None:
            return StreamDelta("", self._ended)
        self._raw_chars += len(delta)
        text = self._through(self._sanitize.feed(delta))
        if not self._ended and (self._sanitize.stopped or getattr(self._sanitize, "cut", False)):
            text += self._through("", end=True)
            self._ended = "stop" if self._sanitize.stopped else "length"
        return self._release(text)

    def finish(
        self, finish_reason: str | None = None, completion_tokens: int | None = None
    ) -> ProcessedOutput:
        """End the stream (the engine's finish reason and token count); the result's
        ``tail`` is what is left to send."""
        if self._result is not None:
            return self._result
        if not self._ended:
            self._through(self._sanitize.flush(), end=True, hold=True)
        if self._ended != "content_filter":
            self._held.append(self._post.tail())
        stages = self._processor.stages
        if self._ended:
            reason, problems = self._ended, []
        else:
            reason, problems = stages.sanitize.verify_length(
                finish_reason, completion_tokens, self.request
            )
        sent = "".join(self._sent)
        text = sent + "".join(self._held)
        fmt = stages.detect_format.detect(text, self.request)
        parsed = stages.parse.parse(text, fmt, self.request)
        errors = [*problems, *stages.validate.validate(parsed, fmt, reason, self.request)]
        output = ProcessedOutput(
            text=text,
            finish_reason=reason,
            format=fmt,
            parsed=parsed.value,
            valid=not errors,
            errors=tuple(errors),
            findings=tuple(self._findings),
            code_blocks=code_blocks(text)
            if fmt != "json" and ("```" in text or "~~~" in text)
            else (),
        )
        raw_chars = None if self._ended else self._raw_chars  # after a cut, deltas stop arriving
        facts = OutputFacts(raw_chars, completion_tokens, getattr(self._post, "dropped", 0))
        stages.post_process.finalize(output, facts, self.request)
        if self.request.template is not None:
            try:
                output.text = self._processor.templates.render(self.request.template, output)
            except MAIError as exc:  # the template does not fit this output: keep the text
                output.errors = (*output.errors, exc.message)
                output.valid = False
        output.tail = output.text[len(sent) :]
        self._result = output
        return output

    @property
    def sent(self) -> str:
        return "".join(self._sent)

    # -- internals --------------------------------------------------------------------------

    def _through(self, clean: str, end: bool = False, hold: bool = False) -> str:
        """Sanitized text -> segments -> safety -> segment transform; ``end`` flushes."""
        if self._segmenter is None:
            self._offset += len(clean)
            return clean
        segments = self._segmenter.feed(clean) if clean else []
        if end:
            segments += self._segmenter.flush()
        out: list[str] = []
        for segment in segments:
            verdict = self._guard.apply(segment, self._offset) if self._guard.active else None
            self._offset += len(segment)
            if verdict is not None:
                self._findings.extend(verdict.findings)
                if verdict.blocked:
                    self._ended = "content_filter"
                    break
                segment = verdict.text
            out.append(self._post.segment(segment))
        text = "".join(out)
        if hold:
            self._held.append(text)
            return ""
        return text

    def _release(self, text: str) -> StreamDelta:
        if self._hold_all:
            self._held.append(text)
            return StreamDelta("", self._ended)
        if text:
            self._sent.append(text)
        return StreamDelta(text, self._ended)
