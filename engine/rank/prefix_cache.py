"""Prefix caching: reuse the KV of a shared prefix instead of computing it again.

A finished sequence's KV (its prompt and output, all but the newest token) is copied into one
of a few extra cache slots of the model runner, keyed by its token ids. A new request whose
prompt starts with those tokens — the next turn of a conversation repeats the whole earlier
conversation, and many requests share a system prompt — gets the matching prefix copied into
its own slot and is prefilled only from where the match ends.

This class only does the bookkeeping on rank 0 (which tokens live in which cache slot, which
entries are pinned by requests that will load them, least-recently-used eviction); the copies
travel to every tensor-parallel rank in the step plan (``kv_saves`` before the slot moves,
``kv_loads`` after them). A match costs a binary search of slice comparisons per entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Entry:
    slot: int
    tokens: list[int]
    last_used: int
    pins: int = 0


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    saved: int = 0
    evicted: int = 0
    entries: list = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """Which token prefixes live in which cache slot (``first_slot .. first_slot + n - 1``)."""

    def __init__(self, first_slot: int, num_slots: int, min_tokens: int = 16) -> None:
        self.first_slot = first_slot
        self.num_slots = num_slots
        self.min_tokens = min_tokens
        self._entries: dict[int, _Entry] = {}
        self._clock = 0
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.num_slots > 0

    def lookup(self, prompt: list[int]) -> tuple[int, int] | None:
        """``(cache_slot, tokens)`` of the longest cached prefix of ``prompt``, pinned.

        At least one prompt token is always left to compute (its logits give the first output
        token). The caller must ``release`` the pin once the copy is in a step plan.
        """
        if not self.enabled:
            return None
        self.stats.lookups += 1
        limit = len(prompt) - 1
        best: tuple[int, _Entry] | None = None
        for entry in self._entries.values():
            n = _common_prefix(prompt, entry.tokens, limit)
            if n >= self.min_tokens and (best is None or n > best[0]):
                best = (n, entry)
        if best is None:
            return None
        n, entry = best
        entry.pins += 1
        entry.last_used = self._tick()
        self.stats.hits += 1
        self.stats.hit_tokens += n
        return entry.slot, n

    def release(self, slot: int) -> None:
        entry = self._entries.get(slot)
        if entry is not None and entry.pins:
            entry.pins -= 1

    def store(self, tokens: list[int]) -> int | None:
        """The cache slot to copy ``tokens``' KV into, or None (too short, or all pinned).

        An entry that ``tokens`` extends (the same conversation one turn earlier) is replaced
        in place; otherwise a free slot, else the least recently used unpinned entry.
        """
        if not self.enabled or len(tokens) < self.min_tokens:
            return None
        target: _Entry | None = None
        for entry in self._entries.values():
            if entry.pins:
                continue
            if len(entry.tokens) <= len(tokens) and tokens[: len(entry.tokens)] == entry.tokens:
                target = entry
                break
        if target is None:
            free = [s for s in range(self.first_slot, self.first_slot + self.num_slots) if s not in self._entries]
            if free:
                target = _Entry(free[0], [], 0)
                self._entries[target.slot] = target
            else:
                unpinned = [e for e in self._entries.values() if not e.pins]
                if not unpinned:
                    return None
                target = min(unpinned, key=lambda e: e.last_used)
                self.stats.evicted += 1
        target.tokens = list(tokens)
        target.last_used = self._tick()
        self.stats.saved += 1
        return target.slot

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def __len__(self) -> int:
        return len(self._entries)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit`` (slice compares in C)."""
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
