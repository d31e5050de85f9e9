"""A consistent-hash ring: a key maps to the same member while the member set is unchanged,
and a member's arrival or departure moves only ~1/N of the keys.

The model deployments route a session's turns with it (``deployments.llm_server.routing``), so
a session keeps reaching the replica whose prefix cache holds its blocks.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable


def _hash(text: str) -> int:
    # blake2b, not hash(): the same key must land on the same member in every process.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Members placed ``virtual_nodes`` times each on a ring of 64-bit hashes."""

    def __init__(self, members: Iterable[str] = (), virtual_nodes: int = 100) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes={virtual_nodes} must be at least 1")
        self.virtual_nodes = virtual_nodes
        self.members: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []
        self.update(members)

    def update(self, members: Iterable[str]) -> bool:
        """Rebuild for ``members``; False (and nothing done) when the set is unchanged."""
        members = frozenset(members)
        if members == self.members and self._points:
            return False
        ring = sorted((_hash(f"{m}:{i}"), m) for m in members for i in range(self.virtual_nodes))
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]
        self.members = members
        return True

    def lookup(self, key: str, count: int = 1) -> list[str]:
        """The member owning ``key``, then the next distinct members clockwise (``count`` in
        all, fewer when the ring has fewer members)."""
        if not self._points:
            return []
        start = bisect.bisect_right(self._points, _hash(key))
        found: list[str] = []
        for offset in range(len(self._points)):
            owner = self._owners[(start + offset) % len(self._points)]
            if owner not in found:
                found.append(owner)
                if len(found) == min(count, len(self.members)):
                    break
        return found


__all__ = ["HashRing"]
