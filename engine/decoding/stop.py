"""Stop strings on a streamed text: what is safe to send now, and whether to stop.

OpenAI semantics: the output ends just before the stop string, which is never sent, not
even partly. Text that could be the start of a stop string (``"#"`` when a stop is
``"###"``) is held back until the next delta proves it is not, or until ``flush``.

The matcher is an Aho-Corasick automaton over characters, fed incrementally: its state is
the longest suffix of the text so far that is a prefix of some stop string, which is
exactly the text to hold back. A ``feed`` therefore costs O(len(delta) + longest stop) and
never rescans earlier text.

When stop strings overlap, the first one to *complete* wins (what a token-by-token stream
would see), and among those completing at the same character the longest, so that the cut
is made before all of it. The result does not depend on how the text is split into deltas.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from cluster.errors import InvalidRequestError


class StopStringMatcher:
    """Feed text deltas; get the part safe to emit and whether a stop string was hit."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        patterns = list(dict.fromkeys(stop))  # de-duplicated, order kept
        if any(not s for s in patterns):
            raise InvalidRequestError(
                "stop strings must not be empty; remove the empty one", param="stop"
            )
        self.stop = tuple(patterns)
        # State 0 is the root. goto: explicit edges; fail: the longest proper suffix that is
        # also a state; match: the longest stop string ending at this state ("" for none).
        self._goto: list[dict[str, int]] = [{}]
        self._depth: list[int] = [0]
        self._fail: list[int] = [0]
        self._match: list[str] = [""]
        for pattern in patterns:
            self._insert(pattern)
        self._link()
        self._state = 0
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the output

    # ------------------------------------------------------------------ streaming

    def feed(self, delta: str) -> tuple[str, bool]:
        """``(text safe to emit now, stopped)``; after a stop, always ``("", True)``."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        goto, fail, match = self._goto, self._fail, self._match
        state = self._state
        base = len(self._pending)
        for offset, char in enumerate(delta):
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            hit = match[state]
            if hit:
                text = self._pending + delta[: offset + 1]
                self.stopped, self.matched = True, hit
                self._pending, self._state = "", 0
                return text[: base + offset + 1 - len(hit)], True
        self._state = state
        text = self._pending + delta
        hold = self._depth[state]
        cut = len(text) - hold
        self._pending = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """The held-back text at the end of the stream ("" after a stop)."""
        text, self._pending, self._state = self._pending, "", 0
        return "" if self.stopped else text

    @property
    def held_back(self) -> str:
        return self._pending

    # ------------------------------------------------------------------ construction

    def _insert(self, pattern: str) -> None:
        state = 0
        for char in pattern:
            nxt = self._goto[state].get(char)
            if nxt is None:
                nxt = len(self._goto)
                self._goto.append({})
                self._depth.append(self._depth[state] + 1)
                self._fail.append(0)
                self._match.append("")
                self._goto[state][char] = nxt
            state = nxt
        self._match[state] = pattern

    def _link(self) -> None:
        """Breadth-first failure links; a state inherits its failure state's match."""
        queue = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self._goto[state].items():
                queue.append(child)
                fallback = self._fail[state]
                while fallback and char not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                target = self._goto[fallback].get(char, 0)
                self._fail[child] = target if target != child else 0
                if not self._match[child]:
                    self._match[child] = self._match[self._fail[child]]
