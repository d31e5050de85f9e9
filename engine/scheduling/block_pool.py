"""The paged KV cache's bookkeeping: blocks, reference counts and the prefix cache on blocks.

The model runner's KV cache is a pool of ``num_blocks`` blocks per layer, each holding the keys
and values of ``block_size`` consecutive positions of one sequence. A sequence owns a *block
table* (``engine.scheduling.scheduler.Sequence.block_table``): its position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``. This class hands blocks out and takes
them back; it never touches KV (nothing is copied when a sequence ends or is preempted).

Automatic prefix caching: a block whose ``block_size`` positions are all computed is keyed by
``hash((parent_key, its tokens))``, so a key names the whole token prefix up to the block's end.
A new sequence whose first full blocks have keys in the table takes those blocks by reference
count instead of computing them again. When the last sequence holding a keyed block lets go,
the block keeps its KV and its key and joins the *evictable* list (least recently released
first); it is reused for other KV only when no never-keyed block is free. A conversation's next
turn repeats the earlier turns, so it finds their blocks this way with no session-specific code.

Placement: a sequence's next block is the block right after its last one when that is free,
and a sequence's first block is placed in the longest free run of the pool (at its start
when the run starts the pool, else in its middle, leaving the block before it room to grow). Sequences then usually
hold consecutive blocks, which the runner reads as one view instead of gathering them.

Not thread-safe: the scheduler owns one pool and calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from cluster.errors import ConfigError, MAIError

NO_PARENT = 0x4D41492D  # the parent key of a sequence's first block


def block_key(parent: int, tokens: Sequence[int]) -> int:
    """The prefix-cache key of a full block: its tokens and every token before it (by chain)."""
    return hash((parent, tuple(tokens)))


class BlockPool:
    """Reference-counted KV blocks with a prefix cache and least-recently-used eviction."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ConfigError(
                f"num_blocks={num_blocks} must be >= 1; give the KV cache at least one block",
                param="kv_cache_blocks",
            )
        if block_size < 1:
            raise ConfigError(f"block_size={block_size} must be >= 1", param="kv_block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._key: list[int | None] = [None] * num_blocks
        self._free = np.ones(num_blocks, dtype=bool)  # ref 0 and no key
        self._num_free = num_blocks
        self._cached: dict[int, int] = {}  # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 with a key, LRU first
        self.num_in_use = 0
        self.evictions = 0

    # -- queries ----------------------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Blocks a sequence could get now: free ones and evictable cached ones."""
        return self._num_free + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by running sequences (vLLM's kv_cache_usage_perc)."""
        return self.num_in_use / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def lookup(self, keys: Iterable[int]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` from the first one (nothing taken)."""
        if not self.enable_caching:
            return []
        hits = []
        cached = self._cached
        for key in keys:
            block = cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cost(self, hits: Sequence[int]) -> int:
        """Available blocks that taking ``hits`` uses up (the evictable ones among them)."""
        return sum(1 for b in hits if self._ref[b] == 0)

    # -- taking and giving back -------------------------------------------------------------

    def take(self, blocks: Iterable[int]) -> None:
        """Take one more reference on each of ``blocks`` (prefix-cache hits)."""
        for b in blocks:
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
                self.num_in_use += 1
            self._ref[b] += 1

    def allocate(self, after: int | None = None) -> int | None:
        """A block for new KV, or None when none is left; see the module docstring for where."""
        free = self._free
        if self._num_free:
            if after is not None and after + 1 < self.num_blocks and free[after + 1]:
                block = after + 1
            else:
                block = self._longest_free_run_start()
            free[block] = False
            self._num_free -= 1
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            key = self._key[block]
            self._key[block] = None
            if self._cached.get(key) == block:
                del self._cached[key]
            self.evictions += 1
        else:
            return None
        self._ref[block] = 1
        self.num_in_use += 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block, last block first (it is evicted first)."""
        for b in reversed(blocks):
            ref = self._ref[b] - 1
            if ref < 0:
                raise MAIError(f"block {b} was released more often than taken", param="block")
            self._ref[b] = ref
            if ref:
                continue
            self.num_in_use -= 1
            if self._key[b] is not None:
                self._evictable[b] = None
            else:
                self._free[b] = True
                self._num_free += 1

    def register(self, block: int, key: int) -> None:
        """``block`` now holds the full block that ``key`` names: later prompts may share it."""
        if not self.enable_caching or self._key[block] is not None:
            return
        if key not in self._cached:  # another sequence may have computed the same block first
            self._cached[key] = block
            self._key[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix (benchmarks use this between runs)."""
        for b in list(self._evictable):
            self._key[b] = None
            self._free[b] = True
            self._num_free += 1
        self._evictable.clear()
        for b in self._cached.values():
            self._key[b] = None
        self._cached.clear()

    def _longest_free_run_start(self) -> int:
        free = self._free.view(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], free, [0]))))
        starts, ends = edges[::2], edges[1::2]
        i = int(np.argmax(ends - starts))
        start = int(starts[i])
        # A run that follows a used block starts in its middle: the sequence holding that block
        # keeps room to grow into consecutive blocks, and so does the new one.
        return start if start == 0 else start + int(ends[i] - start) // 2
