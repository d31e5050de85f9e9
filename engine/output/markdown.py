"""Markdown normalization, one line at a time (so that it can run on the stream).

- code fences: tracked, never touched inside; one left open at the end is closed;
- lists: unordered items use ``-`` (``*`` and ``+`` rewritten), ordered items are numbered
  consecutively from the list's first number (models often write ``1. 1. 1.`` or skip);
- blank lines: at most one in a row outside code blocks.

A list ends at a line of text that is not indented deeper than the list; blank lines keep it
open (a loose list).
"""

from __future__ import annotations

import re

FENCE = re.compile(r"^[ ]{0,3}(`{3,}|~{3,})[ \t]*([^\n`]*)$")
_ITEM = re.compile(
    r"^(?P<indent>[ \t]*)(?:(?P<bullet>[-*+])|(?P<number>\d{1,9})(?P<delim>[.)]))(?P<space>[ \t]+)"
)
_THEMATIC_BREAK = re.compile(r"^[ ]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")


class MarkdownLines:
    """Feed line-start pieces in order; get them normalized. Call ``tail`` at the end."""

    def __init__(self, normalize_lists: bool = True) -> None:
        self.normalize_lists = normalize_lists
        self.fence: str | None = None  # the open fence's characters
        self._numbers: dict[int, int] = {}  # indent width -> the last number used there

    @property
    def in_code(self) -> bool:
        return self.fence is not None

    def line_start(self, piece: str) -> str:
        """``piece`` begins a line (it may hold the whole line or only its first part)."""
        line = piece.rstrip("\n")
        match = FENCE.match(line)
        if self.fence is not None:
            if (
                match
                and match.group(1)[0] == self.fence[0]
                and len(match.group(1)) >= len(self.fence)
                and not match.group(2).strip()
            ):
                self.fence = None
            return piece
        if match:
            self.fence = match.group(1)
            self._numbers.clear()
            return piece
        if not line.strip():
            return piece  # a blank line keeps lists open
        if not self.normalize_lists:
            return piece
        return self._list_item(piece, line)

    def _list_item(self, piece: str, line: str) -> str:
        item = _ITEM.match(piece)
        indent = len(line) - len(line.lstrip(" \t"))
        if item is None or _THEMATIC_BREAK.match(line):
            # text: ends every list at this indent or deeper
            for width in [w for w in self._numbers if w >= indent]:
                del self._numbers[width]
            return piece
        for width in [w for w in self._numbers if w > indent]:
            del self._numbers[width]  # back to an outer list: its inner lists are over
        if item["bullet"]:
            self._numbers.pop(indent, None)
            return (
                f"{item['indent']}-{item['space']}{piece[item.end() :]}"
                if item["bullet"] != "-"
                else piece
            )
        previous = self._numbers.get(indent)
        number = int(item["number"]) if previous is None else previous + 1
        self._numbers[indent] = number
        return f"{item['indent']}{number}{item['delim']}{item['space']}{piece[item.end() :]}"

    def tail(self, ends_with_newline: bool) -> str:
        """What closes the document: the fence of a code block left open."""
        if self.fence is None:
            return ""
        return ("" if ends_with_newline else "\n") + self.fence
