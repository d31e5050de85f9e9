"""Dense KV-cache slot allocation.

The KV cache is preallocated per layer as ``[num_slots, kv_heads, max_len, head_dim]`` and
each running sequence owns one slot. Slots are kept *dense*: the ``n`` running sequences
occupy slots ``0..n-1``, so the model runner attends over the view ``cache[:n]`` without a
gather. Freeing a slot in the middle therefore moves the last used slot into the hole; the
caller gets that move back and must copy the KV rows ``src -> dst`` before the next forward.

Not thread-safe on its own: the scheduler owns one allocator and guards it with its lock.
"""

from __future__ import annotations

from cluster.errors import CapacityError, ConfigError, MAIError


class SlotAllocator:
    """Hands out slots ``0..n-1`` densely; ``release`` fills holes by moving the last slot."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ConfigError(
                f"num_slots={num_slots} must be >= 1; size the KV cache for at least one sequence",
                param="num_slots",
            )
        self._num_slots = num_slots
        self._used = 0

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self._num_slots - self._used

    def allocate(self) -> int:
        """The next dense slot (``used`` before the call); raises when all slots are taken."""
        if self._used >= self._num_slots:
            raise CapacityError(
                f"all {self._num_slots} KV slots are in use; release one first or raise num_slots"
            )
        slot = self._used
        self._used += 1
        return slot

    def release(self, slot: int) -> tuple[int, int] | None:
        """Free ``slot``; returns the move ``(src=n-1, dst=slot)`` to apply, or None.

        None when ``slot`` was the last used one (nothing to move). Otherwise the sequence in
        slot ``n-1`` now owns ``slot`` and its KV rows must be copied there.
        """
        if not 0 <= slot < self._used:
            # A caller bug (double release), not a bad request: internal error.
            raise MAIError(
                f"slot={slot} is not in use (used slots are 0..{self._used - 1}); "
                f"release each slot once",
                param="slot",
            )
        self._used -= 1
        last = self._used
        if slot == last:
            return None
        return (last, slot)
