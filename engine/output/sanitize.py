"""Sanitize: the first stage. Cleans raw model text as it streams.

In this order, each an incremental filter whose result does not depend on how the text is
split into deltas (it holds back what the next delta could still change):

1. stop sequences (the request's and the configured ones): the output ends before the
   first one, which is never sent (``engine.decoding.stop.StopStringMatcher``);
2. characters that must not reach a client: C0/C1 control characters (tab and newline
   kept; ``\\r`` dropped), bidi overrides and zero-width no-break spaces (text that
   renders differently from what it says), U+FFFD left by invalid UTF-8, lone surrogates;
3. special tokens and chat-template fragments that leaked (``<s>``, ``</s>``, ``[INST]``,
   ``<<SYS>>`` ...), removed in one left-to-right pass, longest first;
4. an optional cap on the output's characters (``finish_reason="length"`` when it cuts).

``verify_length`` checks the token count against ``max_tokens`` at the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from engine.decoding.stop import StopStringMatcher
from engine.output.types import OutputRequest

DEFAULT_FRAGMENTS: tuple[str, ...] = (
    "<s>",
    "</s>",
    "<unk>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
)

# C0 controls but \t and \n, DEL and C1, zero-width space / word joiner / BOM, bidi
# embeddings, overrides and isolates, lone surrogates. ZWJ/ZWNJ stay (emoji, scripts).
_UNSAFE_CHARS = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\u202a-\u202e\u2066-\u2069\ud800-\udfff"
)
_UNSAFE = re.compile(f"[{_UNSAFE_CHARS}]")
_UNSAFE_OR_REPLACEMENT = re.compile(f"[{_UNSAFE_CHARS}\ufffd]")


class LiteralRemover:
    """Removes every occurrence of some literal strings, leftmost and longest first.

    Streaming: from where the longest suffix of the text that is a proper prefix of a
    pattern begins, text is held back (a later delta may complete a match there); matches
    that start before it are final, so the result equals one pass over the whole text.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(sorted({p for p in patterns if p}, key=len, reverse=True))
        self._pending = ""
        if not self.patterns:
            self._regex = None
            return
        self._regex = re.compile("|".join(re.escape(p) for p in self.patterns))
        self._first = re.compile("[" + re.escape("".join({p[0] for p in self.patterns})) + "]")
        self._prefixes = {p[:k] for p in self.patterns for k in range(1, len(p))}
        self._longest = len(self.patterns[0])

    def feed(self, text: str) -> str:
        if self._regex is None:
            return text
        buffer = self._pending + text if self._pending else text
        if not self._first.search(buffer):
            self._pending = ""
            return buffer
        # Decisions at positions before `hold_from` are final: later text could only change
        # a match starting at or after it (where the buffer's end may begin a pattern).
        hold_from = len(buffer)
        for k in range(min(len(buffer), self._longest - 1), 0, -1):
            if buffer[-k:] in self._prefixes:
                hold_from = len(buffer) - k
                break
        pieces: list[str] = []
        pos = 0
        for match in self._regex.finditer(buffer):
            if match.start() >= hold_from:
                break
            pieces.append(buffer[pos : match.start()])
            pos = match.end()  # may run past hold_from: that match is final too
        cut = max(pos, hold_from)
        pieces.append(buffer[pos:cut])
        self._pending = buffer[cut:]
        return "".join(pieces)

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return self._regex.sub("", text) if self._regex is not None else text


class SanitizeFilter:
    """One request's sanitizer (a ``TextFilter``)."""

    def __init__(
        self,
        stop: Sequence[str],
        fragments: Sequence[str],
        *,
        remove_unsafe_chars: bool,
        remove_replacement_char: bool,
        max_chars: int | None,
    ) -> None:
        self._stop = StopStringMatcher(tuple(dict.fromkeys(stop))) if stop else None
        self._chars = (
            (_UNSAFE_OR_REPLACEMENT if remove_replacement_char else _UNSAFE)
            if remove_unsafe_chars
            else None
        )
        self._fragments = LiteralRemover(fragments)
        self._max_chars = max_chars
        self._emitted = 0
        self.stopped = False  # a stop sequence ended the output
        self.cut = False  # max_chars ended the output

    def feed(self, text: str) -> str:
        if self.stopped or self.cut:
            return ""
        if self._stop is not None:
            text, hit = self._stop.feed(text)
            if hit:
                return self._finish(text)
        return self._limit(self._fragments.feed(self._clean(text)))

    def flush(self) -> str:
        if self.cut:
            return ""
        tail = ""
        if self._stop is not None and not self.stopped:
            tail = self._stop.flush()
        return self._limit(self._fragments.feed(self._clean(tail)) + self._fragments.flush())

    def _finish(self, text: str) -> str:
        """A stop sequence was hit: release what precedes it and end."""
        self.stopped = True
        text = self._limit(self._fragments.feed(self._clean(text)) + self._fragments.flush())
        if self.cut:  # max_chars came first: the output ends for its length
            self.stopped = False
        return text

    def _clean(self, text: str) -> str:
        if self._chars is None or not text:
            return text
        return self._chars.sub("", text)

    def _limit(self, text: str) -> str:
        if self._max_chars is None or not text:
            return text
        room = self._max_chars - self._emitted
        if len(text) > room:
            self.cut = True
            text = text[:room]
        self._emitted += len(text)
        return text


class Sanitizer:
    """The default ``sanitize`` stage."""

    def __init__(
        self,
        *,
        fragments: Sequence[str] = DEFAULT_FRAGMENTS,
        stop_sequences: Sequence[str] = (),
        remove_unsafe_chars: bool = True,
        remove_replacement_char: bool = True,
        max_chars: int | None = None,
    ) -> None:
        self.fragments = tuple(fragments)
        self.stop_sequences = tuple(stop_sequences)
        self.remove_unsafe_chars = remove_unsafe_chars
        self.remove_replacement_char = remove_replacement_char
        self.max_chars = max_chars

    def open(self, request: OutputRequest) -> SanitizeFilter:
        return SanitizeFilter(
            (*request.stop, *self.stop_sequences),
            self.fragments,
            remove_unsafe_chars=self.remove_unsafe_chars,
            remove_replacement_char=self.remove_replacement_char,
            max_chars=self.max_chars,
        )

    @staticmethod
    def verify_length(
        finish_reason: str | None, completion_tokens: int | None, request: OutputRequest
    ) -> tuple[str | None, list[str]]:
        """``length`` when the output used all of ``max_tokens`` without another reason;
        a problem when it used more than that (the engine broke its promise)."""
        problems: list[str] = []
        limit = request.max_tokens
        if limit is not None and completion_tokens is not None:
            if completion_tokens > limit:
                problems.append(
                    f"completion_tokens={completion_tokens} is above max_tokens={limit}: the "
                    "output was not cut where it should have been"
                )
            if completion_tokens >= limit and finish_reason is None:
                finish_reason = "length"
        return finish_reason, problems
