"""A replica's recent latency, as the autoscaling policy reads it.

Each replica keeps the time to first token and queue time of the requests that got their
first token during the look-back window, plus the requests still waiting for one. The TTFT it
reports is the larger of the window's p90 and the age of its oldest waiting request: when a
replica is so overloaded that nothing finishes, finished requests alone would report nothing
(or stale good news) while the queue grows.
"""

from __future__ import annotations

import collections
import time


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank; 0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


class LatencyWindow:
    """Time to first token and queue time over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 30.0, clock=time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: collections.deque[tuple[float, float, float]] = collections.deque()
        self._waiting: dict[str, float] = {}

    def started(self, request_id: str, at: float | None = None) -> None:
        self._waiting[request_id] = self.clock() if at is None else at

    def first_token(self, request_id: str, ttft_s: float, queue_s: float) -> None:
        self._waiting.pop(request_id, None)
        self._samples.append((self.clock(), ttft_s, queue_s))

    def finished(self, request_id: str) -> None:
        """The request ended (also without a token: an error or a cancellation)."""
        self._waiting.pop(request_id, None)

    def _prune(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def report(self, q: float = 0.9) -> dict[str, float]:
        """``ttft`` and ``queue`` (seconds) as the policy reads them, and ``waiting``."""
        now = self.clock()
        self._prune(now)
        oldest = max((now - t for t in self._waiting.values()), default=0.0)
        ttft = quantile([s[1] for s in self._samples], q)
        queue = quantile([s[2] for s in self._samples], q)
        return {"ttft": max(ttft, oldest), "queue": queue, "waiting": float(len(self._waiting))}


__all__ = ["LatencyWindow", "quantile"]
