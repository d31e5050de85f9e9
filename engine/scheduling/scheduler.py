"""The iteration-level scheduler (vLLM v1 style): which tokens run in the next engine step.

Interface (documented; the engine core and the tests rely on it)
---------------------------------------------------------------
- ``Sequence`` is the scheduler's view of one request: prompt, output so far, how many tokens
  already have their KV in the cache (``num_computed_tokens``) and its KV block table.
- ``Scheduler.add(seq)`` queues a request; ``abort(request_id)`` cancels it (from any
  thread); ``finish(request_id, reason)`` is the engine saying it is done (stop token, stop
  string). Both give its blocks back at once: the next ``schedule()`` can reuse them.
- One engine step is ``out = schedule()``, then the runner runs the forward for
  ``out.decode`` and ``out.prefill`` (each sequence's ``block_table`` says where its KV is),
  samples, and calls ``update(out, sampled)`` with ``{request_id: token}`` for every decode
  sequence and every prefill chunk whose ``completes_prompt`` is true. ``update`` appends the
  tokens and finishes a sequence with reason ``"length"`` when it reaches ``max_tokens``
  (``add`` refuses prompt + max_tokens > max_model_len, so that is also the context limit);
  every other stop decision is the engine's (it then calls ``finish``; a sequence already
  finished is left as it is, and the engine may still report its own reason).
  A sequence whose sampled token is missing is left as it was and runs that position again
  at the next step. Invariant of a running sequence: ``num_computed_tokens <= num_tokens - 1``
  (the newest token's KV is written by the step that consumes it); a decoding one has
  equality.

Policy
------
Each step first schedules every running sequence that is decoding (one token each, so
decoding never stalls), then spends what is left of ``max_batched_tokens`` on prefill:
partially prefilled running sequences first, then waiting requests in arrival order (FCFS)
while fewer than ``max_num_seqs`` run, budget remains and the KV pool has the blocks of the
first chunk plus a watermark (``watermark`` of the pool stays free for running sequences to
grow into). A prompt longer than the remaining budget is prefilled in chunks over several
steps (chunked prefill), so a long prompt delays the running sequences by at most one
budget's worth of tokens per step.

KV blocks (``engine.scheduling.block_pool``): a sequence gets blocks as its tokens are scheduled. On
admission its prompt's full blocks are looked up in the prefix cache and shared when found
(at least one token is always computed: its logits give the next token). When a running
sequence needs a block and none is left, the most recently admitted running sequence is
*preempted*: its blocks go back to the pool (the full ones stay cached) and it returns to the
front of the queue with its prompt and output so far. When it runs again it prefills all of
those tokens except the newest (mostly from the prefix cache) and then decodes the newest,
so its output continues with no token repeated or lost and its client notices nothing.

Thread-safety: one ``threading.Lock`` guards all state; every public method takes it (the
critical sections are short). The engine loop thread calls ``schedule``/``update``/
``finish``; ``add``/``abort`` may come from any thread. A running sequence aborted while a
step is in flight (between ``schedule`` and ``update``) is marked finished at once, but its
blocks are released only at the end of ``update``, so the blocks the runner is writing for
that step are never handed to another sequence under it; ``update`` ignores finished
sequences.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from cluster.errors import CapacityError, ConfigError, InvalidRequestError
from engine.scheduling.block_pool import NO_PARENT, BlockPool, block_key
from engine.scheduling.sequence import PrefillChunk, SchedulerOutput, Sequence, SequenceStatus

__all__ = ["PrefillChunk", "Scheduler", "SchedulerOutput", "Sequence", "SequenceStatus"]


class Scheduler:
    """Iteration-level scheduler with chunked prefill and a paged KV cache; see the module
    docstring. ``num_kv_blocks`` defaults to room for ``max_num_seqs`` full-length sequences."""

    def __init__(
        self,
        max_num_seqs: int,
        max_batched_tokens: int,
        max_model_len: int,
        max_queued_requests: int,
        *,
        retry_after_s: float = 1.0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
    ) -> None:
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={max_num_seqs} must be >= 1", param="max_num_seqs")
        if max_batched_tokens < max_num_seqs:
            raise ConfigError(
                f"max_batched_tokens={max_batched_tokens} is below max_num_seqs={max_num_seqs}: "
                f"a full batch could not decode one token each; raise max_batched_tokens to "
                f">= {max_num_seqs}",
                param="max_batched_tokens",
            )
        if max_model_len < 2:
            raise ConfigError(
                f"max_model_len={max_model_len} must be >= 2 (one prompt and one output token)",
                param="max_model_len",
            )
        if max_queued_requests < 0:
            raise ConfigError(
                f"max_queued_requests={max_queued_requests} must be >= 0",
                param="max_queued_requests",
            )
        if not 0.0 <= watermark < 1.0:
            raise ConfigError(f"watermark={watermark} must be in [0, 1)", param="kv_watermark")
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_model_len = max_model_len
        self.max_queued_requests = max_queued_requests
        self.retry_after_s = retry_after_s
        self.block_size = block_size
        if num_kv_blocks is None:
            num_kv_blocks = max_num_seqs * -(-max_model_len // block_size)
        self.pool = BlockPool(num_kv_blocks, block_size, enable_caching=enable_prefix_caching)
        self.watermark_blocks = int(watermark * num_kv_blocks)
        # vLLM's counters: prompt tokens looked up / found in the prefix cache, preemptions
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.num_preemptions = 0

        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, Sequence] = OrderedDict()  # FCFS, O(1) removal
        self._running: dict[str, Sequence] = {}  # admission order: preempted from the end
        self._step_in_flight = False
        self._deferred_release: list[Sequence] = []  # finished while a step was in flight

    # ------------------------------------------------------------------ queries

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, request_id: str) -> Sequence | None:
        with self._lock:
            return self._running.get(request_id) or self._waiting.get(request_id)

    def clear_prefix_cache(self) -> None:
        with self._lock:
            self.pool.clear_cache()

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``InvalidRequestError`` or ``CapacityError`` (queue full)."""
        self._validate(seq)
        with self._lock:
            rid = seq.request_id
            if rid in self._running or rid in self._waiting:
                raise InvalidRequestError(
                    f"request_id={rid!r} is already in the engine; use a unique request id",
                    param="request_id",
                )
            # Requests that can start at the next step do not count as queued.
            room = self.max_num_seqs - len(self._running)
            if len(self._waiting) >= self.max_queued_requests + max(0, room):
                raise CapacityError(
                    f"the request queue is full ({len(self._waiting)} waiting, "
                    f"max_queued_requests={self.max_queued_requests}, "
                    f"{len(self._running)}/{self.max_num_seqs} sequences running); "
                    f"retry after {self.retry_after_s:g} s or add replicas",
                    retry_after=self.retry_after_s,
                )
            seq.status = SequenceStatus.WAITING
            seq.finish_reason = None
            self._waiting[rid] = seq

    def _validate(self, seq: Sequence) -> None:
        prompt_len = len(seq.prompt_token_ids)
        if prompt_len == 0:
            raise InvalidRequestError(
                "the prompt is empty (0 tokens); send at least one token", param="prompt"
            )
        if seq.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens={seq.max_tokens} must be >= 1", param="max_tokens"
            )
        if seq.num_computed_tokens != 0 or seq.output_token_ids or seq.block_table:
            raise InvalidRequestError(
                f"request_id={seq.request_id!r} already has computed or output tokens; "
                f"add a fresh Sequence",
                param="request_id",
            )
        if prompt_len + seq.max_tokens > self.max_model_len:
            room = self.max_model_len - prompt_len
            fix = (
                f"set max_tokens <= {room} or shorten the prompt"
                if room >= 1
                else f"shorten the prompt to at most {self.max_model_len - 1} tokens"
            )
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens and max_tokens={seq.max_tokens}: "
                f"{prompt_len + seq.max_tokens} tokens do not fit max_model_len="
                f"{self.max_model_len}; {fix}",
                param="max_tokens" if room >= 1 else "prompt",
            )
        blocks = -(-(prompt_len + seq.max_tokens) // self.block_size)
        if blocks > self.pool.num_blocks:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens and max_tokens={seq.max_tokens}: that needs "
                f"{blocks} KV blocks of {self.block_size} tokens and the cache has "
                f"{self.pool.num_blocks}; lower max_tokens or raise kv_cache_blocks",
                param="max_tokens",
            )

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running request (reason ``"abort"``); None if unknown/done."""
        with self._lock:
            seq = self._running.get(request_id) or self._waiting.get(request_id)
            if seq is None:
                return None
            self._finish_locked(seq, "abort")
            return seq

    def finish(self, request_id: str, reason: str) -> None:
        """The engine decided ``request_id`` is done; frees its blocks. Unknown ids are ignored."""
        with self._lock:
            seq = self._running.get(request_id) or self._waiting.get(request_id)
            if seq is not None:
                self._finish_locked(seq, reason)

    # ------------------------------------------------------------------ the step

    def schedule(self) -> SchedulerOutput:
        """Pick the next step's work; see the module docstring for the policy."""
        with self._lock:
            if self._step_in_flight:
                # The previous output was dropped without update(): nothing of it ran, so
                # its sequences are simply scheduled again; settle what was deferred.
                self._release_deferred_locked()
            running = list(self._running.values())
            step = _Step(self.max_batched_tokens)
            for seq in list(running):  # decoding sequences first: one token each
                if seq.status is SequenceStatus.RUNNING and not seq.is_prefilling:
                    if self._reserve_locked(seq, seq.num_tokens, running, step):
                        step.decode.append(seq)
                        step.budget -= 1
            # Partially prefilled ones next. Only the last chunk of a step can be cut by the
            # budget, so at most one sequence is partial unless preemption made more.
            for seq in list(running):
                if step.budget <= 0:
                    break
                if seq.status is not SequenceStatus.RUNNING or not seq.is_prefilling:
                    continue
                start = seq.num_computed_tokens
                length = min(seq.prefill_target - start, step.budget)
                if self._reserve_locked(seq, start + length, running, step):
                    step.add_chunk(seq, start, length)
            while step.budget > 0 and self._waiting and len(self._running) < self.max_num_seqs:
                if not self._admit_locked(next(iter(self._waiting.values())), step):
                    break
            out = SchedulerOutput(
                decode=step.decode,
                prefill=step.prefill,
                num_batched_tokens=self.max_batched_tokens - step.budget,
                preempted=step.preempted,
            )
            self._step_in_flight = True
            return out

    def _admit_locked(self, seq: Sequence, step: _Step) -> bool:
        """Start the first waiting sequence if the pool has its first chunk's blocks."""
        bs, pool = self.block_size, self.pool
        target = seq.prefill_target
        hits: list[int] = []
        if pool.enable_caching:
            # full blocks only, and never the last token's: it is computed to sample from
            hits = pool.lookup(self._keys_locked(seq, (target - 1) // bs))
        start = len(hits) * bs
        length = min(target - start, step.budget)
        need = -(-(start + length) // bs) - len(hits)
        spare = pool.num_available - pool.cost(hits) - need
        if spare < (self.watermark_blocks if self._running else 0):
            return False
        del self._waiting[seq.request_id]
        pool.take(hits)
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        for _ in range(need):
            seq.block_table.append(pool.allocate(seq.block_table[-1] if seq.block_table else None))
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = seq.num_cached_tokens = start
        self._running[seq.request_id] = seq
        if pool.enable_caching and not seq.output_token_ids:
            self.prefix_queries += len(seq.prompt_token_ids)
            self.prefix_hits += start
        step.add_chunk(seq, start, length)
        return True

    def _reserve_locked(self, seq: Sequence, num_tokens: int, running: list, step: _Step) -> bool:
        """Blocks for ``seq``'s positions below ``num_tokens``, preempting the most recently
        admitted running sequences while the pool is empty; False if ``seq`` itself went."""
        table, pool = seq.block_table, self.pool
        while len(table) * self.block_size < num_tokens:
            block = pool.allocate(table[-1] if table else None)
            if block is not None:
                table.append(block)
                continue
            victim = running.pop()
            self._preempt_locked(victim, step)
            if victim is seq:
                return False
        return True

    def _preempt_locked(self, seq: Sequence, step: _Step) -> None:
        """Back to the front of the queue with its tokens; its blocks go back to the pool."""
        step.unschedule(seq)
        del self._running[seq.request_id]
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting[seq.request_id] = seq
        self._waiting.move_to_end(seq.request_id, last=False)
        step.preempted.append(seq)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Record the step's results; see the module docstring. Finished sequences are skipped.

        ``sampled`` values must be Python ints (``tensor.tolist()``), not tensor elements.
        """
        running = SequenceStatus.RUNNING
        bs = self.block_size
        caching = self.pool.enable_caching
        with self._lock:
            get = sampled.get
            for seq in output.decode:
                token = get(seq.request_id)
                if token is None or seq.status is not running:
                    continue  # no token: the same position runs again next step
                seq.num_computed_tokens += 1
                out_ids = seq.output_token_ids
                out_ids.append(token)
                if caching and seq.num_computed_tokens // bs > seq.num_registered_blocks:
                    self._register_locked(seq)
                # add() checked prompt + max_tokens <= max_model_len, so max_tokens is the
                # only length limit left to test on this hot path.
                if len(out_ids) >= seq.max_tokens:
                    self._finish_locked(seq, "length")
            for chunk in output.prefill:
                seq = chunk.seq
                if seq.status is not running:
                    continue
                end = chunk.start + chunk.length
                if not chunk.completes_prompt:
                    seq.num_computed_tokens = end
                    if caching:
                        self._register_locked(seq)
                    continue
                token = sampled.get(seq.request_id)
                if token is None:
                    # Re-run the last prompt token next step (as a 1-token chunk) to sample.
                    seq.num_computed_tokens = end - 1
                    continue
                seq.num_computed_tokens = end
                seq.output_token_ids.append(token)
                if caching:
                    self._register_locked(seq)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    self._finish_locked(seq, "length")
            self._release_deferred_locked()

    # ------------------------------------------------------------------ internals (lock held)

    def _keys_locked(self, seq: Sequence, n: int) -> list[int]:
        """The prefix-cache keys of ``seq``'s first ``n`` full blocks (computed once each)."""
        keys, bs = seq.block_keys, self.block_size
        for i in range(len(keys), n):
            keys.append(block_key(keys[-1] if keys else NO_PARENT, seq.token_ids(i * bs, i * bs + bs)))
        return keys[:n] if len(keys) > n else keys

    def _register_locked(self, seq: Sequence) -> None:
        """Put ``seq``'s newly completed full blocks into the prefix cache."""
        full = seq.num_computed_tokens // self.block_size
        done = seq.num_registered_blocks
        if full <= done:
            return
        keys = self._keys_locked(seq, full)
        table = seq.block_table
        for i in range(done, full):
            self.pool.register(table[i], keys[i])
        seq.num_registered_blocks = full

    def _finish_locked(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.WAITING:
            del self._waiting[seq.request_id]
        elif seq.status is SequenceStatus.RUNNING:
            del self._running[seq.request_id]
            if self._step_in_flight:
                self._deferred_release.append(seq)
            else:
                self._free_blocks_locked(seq)
        else:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release_deferred_locked(self) -> None:
        self._step_in_flight = False
        if not self._deferred_release:
            return
        for seq in self._deferred_release:
            self._free_blocks_locked(seq)
        self._deferred_release.clear()

    def _free_blocks_locked(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []


class _Step:
    """The step being planned: its decode rows, prefill chunks, budget left and preemptions."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.decode: list[Sequence] = []
        self.prefill: list[PrefillChunk] = []
        self.preempted: list[Sequence] = []

    def add_chunk(self, seq: Sequence, start: int, length: int) -> None:
        done = start + length == len(seq.prompt_token_ids) and not seq.output_token_ids
        self.prefill.append(PrefillChunk(seq, start, length, done))
        self.budget -= length

    def unschedule(self, seq: Sequence) -> None:
        """A preempted sequence leaves the step if it was already in it."""
        if seq in self.decode:
            self.decode.remove(seq)
            self.budget += 1
        for chunk in self.prefill:
            if chunk.seq is seq:
                self.prefill.remove(chunk)
                self.budget += chunk.length
                break
