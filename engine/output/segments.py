"""Safe boundaries: cuts a text stream into segments (lines, sentences) as they complete.

Stream-time stages that look at more than one character (content safety, deduplication,
markdown list normalization) work on whole segments, so that a phone number or a
blocklisted phrase is never half sent before it is recognised. A boundary is decided from
the text before it and at most one character after it, never from where the deltas were
split, so the stream and the final text are cut at the same places. A boundary falls:

- after a newline (every line ends a segment; a blank line is a segment of its own);
- after the spaces that follow a sentence end (``.``, ``!``, ``?``, possibly followed by a
  closing quote or bracket), when a non-space character follows;
- in a segment already ``max_chars`` long, after the next space that does not sit between
  two digits (``4111 1111``, ``555 0100`` stay whole);
- in a segment ``hard_max_chars`` long with no such space (a base64 blob), right there.

Matches of safety checks therefore never span a segment boundary; checks are written so
(none of their patterns holds a newline or a sentence end followed by a space).
"""

from __future__ import annotations

_SPACES = " \t"
_SENTENCE_END = ".!?"
_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_NUMBERISH = "0123456789+()-."


class Segmenter:
    """Feed text; get the segments it completes. ``"".join`` of all segments is the text."""

    def __init__(self, max_chars: int = 240, hard_max_chars: int = 2000) -> None:
        if not 1 <= max_chars <= hard_max_chars:
            raise ValueError(f"need 1 <= max_chars={max_chars} <= hard_max_chars={hard_max_chars}")
        self.max_chars = max_chars
        self.hard_max_chars = hard_max_chars
        self._buffer = ""
        self._scan = 0  # buffer[:_scan] holds no boundary (positions decided so far)
        self._last_solid = -1  # index in buffer of the last non-space char before _scan

    def feed(self, text: str) -> list[str]:
        if not text:
            return []
        self._buffer += text
        return self._cut()

    def flush(self) -> list[str]:
        segments = self._cut()
        if self._buffer:
            segments.append(self._buffer)
        self._buffer, self._scan, self._last_solid = "", 0, -1
        return segments

    @property
    def pending(self) -> str:
        return self._buffer

    def _cut(self) -> list[str]:
        segments: list[str] = []
        buf = self._buffer
        n = len(buf)
        start = 0
        i = self._scan
        last_solid = self._last_solid
        while i < n:
            char = buf[i]
            p = i + 1  # candidate boundary after buf[i]
            length = p - start
            boundary = char == "\n" or length >= self.hard_max_chars
            if not boundary and char in _SPACES:
                if p == n:
                    break  # the next character decides; wait for it
                after = buf[p]
                if after not in _SPACES and after != "\n":
                    boundary = self._sentence_end(buf, start, last_solid) or (
                        length >= self.max_chars
                        and not (
                            last_solid >= start
                            and buf[last_solid] in _NUMBERISH
                            and after in _NUMBERISH
                        )
                    )
            if char not in _SPACES and char != "\n":
                last_solid = i
            if boundary:
                segments.append(buf[start:p])
                start = p
            i = p
        if start:
            self._buffer = buf[start:]
            i -= start
            last_solid -= start
        self._scan = i
        self._last_solid = last_solid
        return segments

    @staticmethod
    def _sentence_end(buf: str, start: int, last_solid: int) -> bool:
        """Whether the last non-space char (before the current spaces) ends a sentence."""
        j = last_solid
        while j >= start and buf[j] in _CLOSERS:
            j -= 1
        return j >= start and buf[j] in _SENTENCE_END
