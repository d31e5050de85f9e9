"""Formats: detect, parse and validate the finished text (stages 2-4 of the pipeline).

Built-in formats are ``text``, ``json`` and ``markdown`` (with fenced code blocks); custom
formats are plugins (``FormatHandler``, entry point group ``m_ai.formats``) registered
beside them. A request's ``response_format`` (json_object, json_schema) makes the format
``json`` and its schema the contract: the parsed value is validated with ``jsonschema``,
and output cut by ``max_tokens`` or by the content filter is never reported valid.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from cluster.errors import InvalidRequestError
from engine.decoding.structured import parse_response_format
from engine.output.types import CodeBlock, FormatHandler, OutputRequest, ParseResult

_FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_ONLY_FENCED = re.compile(
    r"\A\s*(`{3,}|~{3,})[ \t]*(?:json)?[ \t]*\n(?P<body>.*?)\n[ \t]*\1[ \t]*\Z", re.S | re.I
)
_MARKDOWN_FEATURES = (
    re.compile(r"^#{1,6}[ \t]+\S", re.M),  # headings
    re.compile(r"^[ \t]*(?:[-*+]|\d{1,3}[.)])[ \t]+\S", re.M),  # list items
    re.compile(r"\*\*\S[^\n]*?\S\*\*|__\S[^\n]*?\S__"),  # strong emphasis
    re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"),  # links
    re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.M),  # table rows
    re.compile(r"`[^`\n]+`"),  # inline code
)


def code_blocks(text: str) -> tuple[CodeBlock, ...]:
    """Fenced code blocks (``` or ~~~), in order; an unclosed one runs to the end."""
    blocks: list[CodeBlock] = []
    opened: tuple[str, str] | None = None  # (fence, language)
    lines: list[str] = []
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if opened is None:
            if match:
                opened = (
                    match["fence"],
                    match["info"].strip().split(" ")[0] if match["info"].strip() else "",
                )
                lines = []
        elif (
            match
            and match["fence"][0] == opened[0][0]
            and len(match["fence"]) >= len(opened[0])
            and not match["info"].strip()
        ):
            blocks.append(CodeBlock(opened[1], "\n".join(lines), True))
            opened = None
        else:
            lines.append(line)
    if opened is not None:
        blocks.append(CodeBlock(opened[1], "\n".join(lines), False))
    return tuple(blocks)


class TextFormat:
    name = "text"
    prose = True

    def detect(self, text: str) -> float:
        return 0.1

    def parse(self, text: str) -> ParseResult:
        return ParseResult(text)

    def validate(self, value: Any, request: OutputRequest) -> list[str]:
        return []


class JsonFormat:
    """JSON text, or one fenced ```json block holding it (what chat models often write)."""

    name = "json"
    prose = False

    def detect(self, text: str) -> float:
        body = self._body(text)
        if not body.startswith(("{", "[")):
            return 0.0
        try:
            json.loads(body)
        except ValueError:
            return 0.4  # starts like JSON: reported as broken JSON rather than as prose
        return 1.0

    def parse(self, text: str) -> ParseResult:
        body = self._body(text)
        if not body:
            return ParseResult(None, ("the output is empty, not JSON",))
        try:
            return ParseResult(json.loads(body))
        except json.JSONDecodeError as exc:
            return ParseResult(
                None, (f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",)
            )

    def validate(self, value: Any, request: OutputRequest) -> list[str]:
        fmt = parse_response_format(request.response_format)
        schema = fmt.effective_schema if fmt is not None and fmt.constrained else None
        return schema_errors(value, schema) if schema is not None else []

    @staticmethod
    def _body(text: str) -> str:
        fenced = _ONLY_FENCED.match(text)
        return (fenced["body"] if fenced else text).strip()


class MarkdownFormat:
    name = "markdown"
    prose = True

    def detect(self, text: str) -> float:
        if any(_FENCE.match(line) for line in text.split("\n") if "`" in line or "~" in line):
            return 0.9
        hits = sum(1 for pattern in _MARKDOWN_FEATURES if pattern.search(text))
        return min(0.85, 0.35 * hits)

    def parse(self, text: str) -> ParseResult:
        return ParseResult({"code_blocks": code_blocks(text)})

    def validate(self, value: Any, request: OutputRequest) -> list[str]:
        return []


BUILTIN_FORMATS: tuple[FormatHandler, ...] = (TextFormat(), JsonFormat(), MarkdownFormat())
_MIN_CONFIDENCE = 0.3

_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_LOCK = threading.Lock()


def schema_errors(value: Any, schema: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Why ``value`` does not satisfy the JSON ``schema`` (at most ``limit`` reasons)."""
    import jsonschema

    key = json.dumps(schema, sort_keys=True)
    with _VALIDATORS_LOCK:
        validator = _VALIDATORS.get(key)
        if validator is None:
            cls = jsonschema.validators.validator_for(schema)
            validator = _VALIDATORS[key] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:limit]
    ]


class FormatRegistry:
    """The formats a processor knows: built-ins first, then plugins (names unique)."""

    def __init__(self, extra: Iterable[FormatHandler] = ()) -> None:
        self.handlers: dict[str, FormatHandler] = {h.name: h for h in BUILTIN_FORMATS}
        for handler in extra:
            if handler.name in self.handlers:
                raise ValueError(f"format {handler.name!r} is registered twice; rename the plugin")
            self.handlers[handler.name] = handler

    def get(self, name: str) -> FormatHandler:
        try:
            return self.handlers[name]
        except KeyError:
            raise InvalidRequestError(
                f"format={name!r} is not a known output format; use one of {', '.join(self.handlers)}",
                param="format",
            ) from None


class FormatDetector:
    """The default ``detect_format`` stage: the request's format, JSON for a JSON
    ``response_format``, else the most confident handler (text below 0.3)."""

    def __init__(self, registry: FormatRegistry) -> None:
        self.registry = registry

    def detect(self, text: str, request: OutputRequest) -> str:
        if request.format:
            return request.format
        fmt = parse_response_format(request.response_format)
        if fmt is not None and fmt.constrained:
            return "json"
        best, score = "text", _MIN_CONFIDENCE
        for handler in self.registry.handlers.values():
            confidence = handler.detect(text)
            if confidence > score:
                best, score = handler.name, confidence
        return best


class FormatParser:
    """The default ``parse`` stage: the format handler's parser."""

    def __init__(self, registry: FormatRegistry) -> None:
        self.registry = registry

    def parse(self, text: str, fmt: str, request: OutputRequest) -> ParseResult:
        return self.registry.get(fmt).parse(text)


class FormatValidator:
    """The default ``validate`` stage: parse errors, the handler's checks, the schema of
    ``response_format``, and whether the output was cut before it was complete."""

    def __init__(self, registry: FormatRegistry) -> None:
        self.registry = registry

    def validate(
        self, parsed: ParseResult, fmt: str, finish_reason: str | None, request: OutputRequest
    ) -> list[str]:
        errors = list(parsed.errors)
        if not parsed.errors:
            errors += self.registry.get(fmt).validate(parsed.value, request)
        requested = parse_response_format(request.response_format)
        structured = requested is not None and requested.constrained
        if structured and finish_reason == "length":
            errors.append(
                "the output was cut at max_tokens (finish_reason=length) before the JSON was "
                "complete; raise max_tokens or bound the schema's strings (maxLength, enum)"
            )
        if finish_reason == "content_filter" and (structured or fmt != "text"):
            errors.append("the output was cut by the content filter (finish_reason=content_filter)")
        return errors
