"""What flows through the output pipeline: its input, its result, and the stage interfaces.

Plain dataclasses and protocols, no heavy imports: the HTTP layer builds an ``OutputRequest``
per request and reads a ``ProcessedOutput``; plugins implement one of the protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

SafetyAction = Literal["allow", "redact", "block"]
STAGE_NAMES = ("sanitize", "detect_format", "parse", "validate", "post_process")


@dataclass(frozen=True)
class OutputRequest:
    """What the pipeline needs to know about one request (built by the serving layer)."""

    tenant: str = "default"
    # OpenAI's response_format: JSON output is validated against it (and was constrained
    # while decoding, engine/decoding/structured.py).
    response_format: Mapping[str, Any] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    template: str | None = None  # a Jinja2 template named in config (output.formats.templates)
    format: str | None = None  # force a format (e.g. a plugin's) instead of detecting it

    @classmethod
    def from_params(cls, params: Any, tenant: str = "default", **extra: Any) -> OutputRequest:
        """The request of an ``engine.types.SamplingParams`` (response_format, max_tokens, stop)."""
        return cls(
            tenant=tenant,
            response_format=params.response_format,
            max_tokens=params.max_tokens,
            stop=tuple(params.stop),
            **extra,
        )


@dataclass(frozen=True)
class RawOutput:
    """The model's whole output, as the engine finished it."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int = 0
    request: OutputRequest = field(default_factory=OutputRequest)


@dataclass(frozen=True)
class Finding:
    """One hit of a safety check. Offsets are in the sanitized text (before redaction); the
    matched text itself is not kept (it may be the very PII being removed)."""

    check: str
    category: str
    start: int
    end: int
    action: SafetyAction = "allow"


@dataclass(frozen=True)
class CodeBlock:
    language: str
    code: str
    closed: bool


@dataclass(frozen=True)
class ParseResult:
    value: Any = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class QualityMetrics:
    """Per-response quality figures, for the metrics layer (``as_dict`` -> gauges)."""

    output_chars: int
    words: int
    repetition_rate: float  # share of word 3-grams that repeat an earlier one
    distinct_1: float  # distinct words / words
    distinct_2: float  # distinct word bigrams / bigrams
    format_valid: bool
    length_ratio: float | None  # completion_tokens / max_tokens
    # output chars / raw chars: what sanitizing, safety and dedup kept (None when the
    # pipeline itself cut the output: what the model wrote after the cut is not counted)
    kept_ratio: float | None
    redactions: int
    deduplicated: int  # segments dropped as repeats

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


# For the metrics layer: each QualityMetrics field and what it measures (histogram help).
QUALITY_METRIC_HELP: dict[str, str] = {
    "output_chars": "characters of the processed output",
    "words": "words of the processed output",
    "repetition_rate": "share of word 3-grams that repeat an earlier one (0: no repetition)",
    "distinct_1": "distinct words / words",
    "distinct_2": "distinct word bigrams / bigrams",
    "format_valid": "1 when the output parsed and validated in its format",
    "length_ratio": "completion tokens / max_tokens",
    "kept_ratio": "processed characters / raw characters",
    "redactions": "spans redacted by content safety",
    "deduplicated": "segments dropped as repeats",
}


@dataclass
class ProcessedOutput:
    """The pipeline's result for one response.

    ``text`` is what the client gets in full; on a stream, ``tail`` is the part of it that
    ``OutputStream.feed`` has not returned yet (send it as the last delta).
    """

    text: str
    finish_reason: str | None
    format: str = "text"
    parsed: Any = None
    valid: bool = True
    errors: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    code_blocks: tuple[CodeBlock, ...] = ()
    summary: str | None = None
    metrics: QualityMetrics | None = None
    tail: str = ""

    @property
    def blocked(self) -> bool:
        return self.finish_reason == "content_filter"


@dataclass(frozen=True)
class StreamDelta:
    """What one ``OutputStream.feed`` releases. ``finish_reason`` is set when the pipeline
    itself ended the output (``content_filter``: blocked; ``stop``: a stop sequence): the
    caller then cancels the generation and calls ``finish``."""

    text: str
    finish_reason: str | None = None


# -- stage interfaces (each default lives in its module; plugins implement the same) -------


@runtime_checkable
class TextFilter(Protocol):
    """Per-request incremental text transform; must not depend on how text is chunked."""

    stopped: bool  # the rest of the output is discarded (a stop sequence was hit)

    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


@runtime_checkable
class SanitizeStage(Protocol):
    def open(self, request: OutputRequest) -> TextFilter: ...

    def verify_length(
        self, finish_reason: str | None, completion_tokens: int | None, request: OutputRequest
    ) -> tuple[str | None, list[str]]:
        """The finish reason to report and any problems with the output's length."""
        ...


@runtime_checkable
class DetectFormatStage(Protocol):
    def detect(self, text: str, request: OutputRequest) -> str: ...


@runtime_checkable
class ParseStage(Protocol):
    def parse(self, text: str, fmt: str, request: OutputRequest) -> ParseResult: ...


@runtime_checkable
class ValidateStage(Protocol):
    def validate(
        self, parsed: ParseResult, fmt: str, finish_reason: str | None, request: OutputRequest
    ) -> list[str]: ...


@dataclass(frozen=True)
class OutputFacts:
    """What the stream learnt that the finished output does not show."""

    raw_chars: int | None  # characters the model produced (None: the pipeline cut the output)
    completion_tokens: int | None
    deduplicated: int  # segments dropped as repeats


@runtime_checkable
class SegmentTransform(Protocol):
    """Per-request transform of complete segments (sentences, lines) at stream time."""

    dropped: int  # segments removed so far (reported as ``deduplicated``)

    def segment(self, text: str) -> str: ...

    def tail(self) -> str:
        """Text appended at the end of the output (e.g. a closing code fence)."""
        ...


@runtime_checkable
class PostProcessStage(Protocol):
    def open(self, request: OutputRequest, prose: bool | None) -> SegmentTransform:
        """``prose``: whether prose transforms apply (None: the transform decides from the
        text, e.g. not on JSON)."""
        ...

    def finalize(self, output: ProcessedOutput, facts: OutputFacts, request: OutputRequest) -> None:
        """Fill ``summary`` and ``metrics`` of the finished output, in place."""
        ...


@runtime_checkable
class SafetyCheck(Protocol):
    """A content safety check (built in, or a plugin in ``m_ai.safety_checks``)."""

    name: str

    def scan(self, text: str) -> list[Finding]:
        """Hits in ``text`` (one segment: a sentence or line); ``action`` is filled later."""
        ...


@runtime_checkable
class FormatHandler(Protocol):
    """An output format (built in, or a plugin in ``m_ai.formats``)."""

    name: str
    prose: bool  # stream-time prose transforms (dedup, markdown lists) may touch it

    def detect(self, text: str) -> float:
        """Confidence in [0, 1] that ``text`` is in this format."""
        ...

    def parse(self, text: str) -> ParseResult: ...

    def validate(self, value: Any, request: OutputRequest) -> list[str]: ...


@runtime_checkable
class Summarizer(Protocol):
    def summarize(self, text: str, max_chars: int) -> str: ...
