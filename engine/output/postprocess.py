"""Post-process: the last stage. Deduplication and markdown normalization on the stream
(segment by segment), then summary and quality metrics on the finished output.

Deduplication drops a segment (a sentence, a line) whose words, case-folded, equal those
of an earlier segment of at least ``dedup_min_chars`` characters; a repeated paragraph is
a run of repeated segments and goes with them. Neither runs inside code blocks nor on
JSON (the stream decides from the first non-blank character: ``{``, or ``[`` followed by
a JSON value), since repeated lines there are meaning, not stutter.

Summarization does not replace the text (a stream cannot take back what it sent): an
output over ``summarize_over_chars`` gets a ``summary`` beside it, from the configured
summarizer (extractive by default: the most representative sentences, in order).
"""

from __future__ import annotations

import re
from collections import Counter

from engine.output.markdown import MarkdownLines
from engine.output.types import (
    OutputFacts,
    OutputRequest,
    ProcessedOutput,
    QualityMetrics,
    Summarizer,
)

_JSON_ARRAY_START = re.compile(r"\[\s*(?:[\[{\"\d\-\]]|true|false|null)")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")


class ProseTransform:
    """One request's stream-time post-processing (a ``SegmentTransform``)."""

    def __init__(
        self, *, prose: bool | None, dedup: bool, dedup_min_chars: int, normalize_markdown: bool
    ) -> None:
        self.prose = prose  # None: decided by the first non-blank segment
        self.dedup = dedup
        self.dedup_min_chars = dedup_min_chars
        self.normalize_markdown = normalize_markdown
        self._lines = MarkdownLines(normalize_lists=normalize_markdown)  # also tracks code fences
        self._seen: set[str] = set()
        self._line_start = True
        self._newlines = 2  # newlines ending what was emitted (the start counts as a break)
        self.dropped = 0  # segments dropped as repeats

    def segment(self, text: str) -> str:
        if self.prose is None:
            if not text.strip():
                return self._emit(text)
            head = text.lstrip()
            self.prose = not (head.startswith("{") or _JSON_ARRAY_START.match(head))
        if not self.prose or not (self.dedup or self.normalize_markdown):
            return self._emit(text)
        line_start = self._line_start
        was_code = self._lines.in_code
        if line_start:
            text = self._lines.line_start(text)
        if was_code or self._lines.in_code:  # a code block, its fences included: untouched
            return self._emit(text)
        blank_line = line_start and text.endswith("\n") and not text.strip()
        if blank_line:
            if self.normalize_markdown and self._newlines >= 2:
                return ""  # at most one blank line in a row
            return self._emit(text)
        if self.dedup and self._is_repeat(text):
            self.dropped += 1
            if text.endswith("\n") and not line_start:
                return self._emit("\n")  # end the line the repeat was on
            return ""
        return self._emit(text)

    def tail(self) -> str:
        if self.prose and self.normalize_markdown:
            return self._lines.tail(self._line_start)
        return ""

    def _is_repeat(self, text: str) -> bool:
        key = " ".join(text.split()).casefold()
        if len(key) < self.dedup_min_chars:
            return False
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def _emit(self, text: str) -> str:
        if text:
            self._line_start = text.endswith("\n")
            solid = text.rstrip()
            breaks = text.count("\n", len(solid))
            self._newlines = self._newlines + breaks if not solid else breaks
        return text


class ExtractiveSummarizer:
    """Keeps the sentences whose words are most frequent in the whole text (Luhn 1958),
    in their original order, within ``max_chars``."""

    def summarize(self, text: str, max_chars: int) -> str:
        sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
        if not sentences:
            return text[:max_chars]
        words = [w.casefold() for w in _WORD.findall(text)]
        weight = Counter(w for w in words if len(w) > 3)

        def score(sentence: str) -> float:
            tokens = [w.casefold() for w in _WORD.findall(sentence)]
            return sum(weight[w] for w in tokens) / (len(tokens) or 1)

        ranked = sorted(range(len(sentences)), key=lambda i: (-score(sentences[i]), i))
        chosen: list[int] = []
        used = 0
        for i in ranked:
            cost = len(sentences[i]) + (1 if chosen else 0)
            if used + cost <= max_chars:
                chosen.append(i)
                used += cost
        if not chosen:
            return sentences[ranked[0]][: max_chars - 1].rstrip() + "…"
        return " ".join(sentences[i] for i in sorted(chosen))


def quality_metrics(
    text: str,
    *,
    format_valid: bool,
    completion_tokens: int | None,
    max_tokens: int | None,
    raw_chars: int | None,
    redactions: int,
    deduplicated: int,
) -> QualityMetrics:
    words = [w.casefold() for w in _WORD.findall(text)]
    bigrams = list(zip(words, words[1:]))
    trigrams = list(zip(words, words[1:], words[2:]))
    return QualityMetrics(
        output_chars=len(text),
        words=len(words),
        repetition_rate=(1.0 - len(set(trigrams)) / len(trigrams)) if trigrams else 0.0,
        distinct_1=len(set(words)) / len(words) if words else 0.0,
        distinct_2=len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        format_valid=format_valid,
        length_ratio=(completion_tokens / max_tokens)
        if completion_tokens is not None and max_tokens
        else None,
        kept_ratio=None if raw_chars is None else (len(text) / raw_chars if raw_chars else 1.0),
        redactions=redactions,
        deduplicated=deduplicated,
    )


class PostProcessor:
    """The default ``post_process`` stage."""

    def __init__(
        self,
        *,
        dedup: bool = True,
        dedup_min_chars: int = 24,
        normalize_markdown: bool = True,
        summarize_over_chars: int | None = None,
        summary_chars: int = 600,
        summarizer: Summarizer | None = None,
        metrics: bool = True,
    ) -> None:
        self.dedup = dedup
        self.dedup_min_chars = dedup_min_chars
        self.normalize_markdown = normalize_markdown
        self.summarize_over_chars = summarize_over_chars
        self.summary_chars = summary_chars
        self.summarizer = summarizer or ExtractiveSummarizer()
        self.metrics = metrics

    @property
    def changes_text(self) -> bool:
        """Whether the stream-time part can change text (else segments need not be cut)."""
        return self.dedup or self.normalize_markdown

    def open(self, request: OutputRequest, prose: bool | None) -> ProseTransform:
        return ProseTransform(
            prose=prose,
            dedup=self.dedup,
            dedup_min_chars=self.dedup_min_chars,
            normalize_markdown=self.normalize_markdown,
        )

    def finalize(self, output: ProcessedOutput, facts: OutputFacts, request: OutputRequest) -> None:
        if self.summarize_over_chars is not None and len(output.text) > self.summarize_over_chars:
            output.summary = self.summarizer.summarize(output.text, self.summary_chars)
        if self.metrics:
            output.metrics = quality_metrics(
                output.text,
                format_valid=output.valid,
                completion_tokens=facts.completion_tokens,
                max_tokens=request.max_tokens,
                raw_chars=facts.raw_chars,
                redactions=sum(1 for f in output.findings if f.action == "redact"),
                deduplicated=facts.deduplicated,
            )
