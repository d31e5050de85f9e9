"""Parallel samples of one prompt (OpenAI's ``n``): siblings wait for their leader's prompt.

The engine core parks a request added with ``share_prompt_of=leader`` while the leader still
computes that same prompt. At the step that completes it (the scheduler has then registered
the prompt's full blocks in the prefix cache), the core admits the parked siblings: their
admission shares those blocks by reference count instead of computing them again. This class
is the bookkeeping only (no Ray, no model): inbox items by leader id.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.inbox import AddRequest


class ParkedSiblings:
    """Inbox items (``AddRequest``) waiting for their leader, by leader id."""

    def __init__(self) -> None:
        self._by_leader: dict[str, list[AddRequest]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_leader)

    def __contains__(self, leader: str) -> bool:
        return leader in self._by_leader

    def park(self, leader: str, item: AddRequest) -> None:
        self._by_leader.setdefault(leader, []).append(item)

    def take(self, leader: str) -> list[AddRequest]:
        """The siblings of ``leader`` (removed; empty when none)."""
        return self._by_leader.pop(leader, [])

    def remove(self, request_id: str) -> AddRequest | None:
        """The parked item of ``request_id`` (removed), or None when it is not parked."""
        for items in self._by_leader.values():
            for item in items:
                if item.request_id == request_id:
                    items.remove(item)
                    return item
        return None

    def drain(self) -> Iterator[AddRequest]:
        """Every parked item (all removed)."""
        groups, self._by_leader = self._by_leader, {}
        for items in groups.values():
            yield from items


__all__ = ["ParkedSiblings"]
