"""The iteration-level scheduler (vLLM v1 style): which tokens run in the next engine step.

Interface (documented; the engine core and the tests rely on it)
---------------------------------------------------------------
- ``Sequence`` is the scheduler's view of one request: prompt, output so far, how many tokens
  already have their KV in the cache (``num_computed_tokens``) and the KV slot it owns.
- ``Scheduler.add(seq)`` queues a request; ``abort(request_id)`` cancels it (from any
  thread); ``finish(request_id, reason)`` is the engine saying it is done (stop token, stop
  string). Both free the slot at once: the next ``schedule()`` can reuse it.
- One engine step is ``out = schedule()``, then the runner applies ``out.slot_moves`` to the
  KV cache, runs the forward for ``out.decode`` and ``out.prefill``, samples, and calls
  ``update(out, sampled)`` with ``{request_id: token}`` for every decode sequence and every
  prefill chunk whose ``completes_prompt`` is true. ``update`` appends the tokens and
  finishes a sequence with reason ``"length"`` when it reaches ``max_tokens`` (``add``
  refuses prompt + max_tokens > max_model_len, so that is also the context limit); every
  other stop decision is the engine's (it then calls ``finish``; a sequence already
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
while a slot is free and budget remains. A prompt longer than the remaining budget is
prefilled in chunks over several steps (chunked prefill), so a long prompt delays the
running sequences by at most one budget's worth of tokens per step.

KV slots stay dense (``engine.rank.kv_slots``): running sequences own slots ``0..n-1``, and
``out.num_slots_used`` is that ``n`` for the step, so the runner may attend over
``cache[:n]``. ``out.decode`` is in slot order; when every running sequence decodes,
``out.decode[i].slot == i``. Freeing a slot in the middle moves the last slot into the
hole. Moves accumulated between two steps are returned, reduced to their net effect, in the
next ``out.slot_moves``: each ``(src, dst)`` reads a slot that no sequence kept and writes
a slot in use, so they are correct applied in order (in fact in any order), and each moved
sequence is copied once even if its slot was refilled in between. A ``src`` may already
belong to a sequence admitted in this same step, which is why the moves must be applied
before the forward writes that sequence's KV.

Thread-safety: one ``threading.Lock`` guards all state; every public method takes it (the
critical sections are short). The engine loop thread calls ``schedule``/``update``/
``finish``; ``add``/``abort`` may come from any thread. A running sequence aborted while a
step is in flight (between ``schedule`` and ``update``) is marked finished at once, but its
slot is released only at the end of ``update``, so the slots the runner is using for that
step never change under it; ``update`` ignores finished sequences.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cluster.errors import CapacityError, ConfigError, InvalidRequestError
from engine.rank.kv_slots import SlotAllocator


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity equality: sequences are compared and hashed as objects
class Sequence:
    """The scheduler's view of one request."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Prompt tokens whose KV the engine copies in from the prefix cache on admission: the
    # first prefill chunk starts after them.
    num_cached_tokens: int = 0
    slot: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output (a new list: prefer ``last_token_id`` on hot paths)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

    @property
    def num_remaining_prompt_tokens(self) -> int:
        return max(0, len(self.prompt_token_ids) - self.num_computed_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class PrefillChunk:
    """Run ``all_token_ids[start:start+length]`` (all prompt tokens) at those positions."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        """The step samples the first output token from this chunk's last position."""
        return self.start + self.length == len(self.seq.prompt_token_ids)


@dataclass
class SchedulerOutput:
    slot_moves: list[tuple[int, int]]  # apply (src, dst) KV copies BEFORE this step's forward
    decode: list[Sequence]  # each runs its last token at position num_tokens - 1; slot order
    prefill: list[PrefillChunk]
    num_batched_tokens: int
    num_slots_used: int = 0  # n: the running sequences own slots 0..n-1 during this step

    @property
    def is_empty(self) -> bool:
        return not (self.decode or self.prefill or self.slot_moves)


class Scheduler:
    """Iteration-level scheduler with chunked prefill; see the module docstring."""

    def __init__(
        self,
        max_num_seqs: int,
        max_batched_tokens: int,
        max_model_len: int,
        max_queued_requests: int,
        *,
        retry_after_s: float = 1.0,
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
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_model_len = max_model_len
        self.max_queued_requests = max_queued_requests
        self.retry_after_s = retry_after_s

        self._lock = threading.Lock()
        self._slots = SlotAllocator(max_num_seqs)
        self._slot_owner: list[Sequence | None] = [None] * max_num_seqs
        self._waiting: OrderedDict[str, Sequence] = OrderedDict()  # FCFS, O(1) removal
        self._running: dict[str, Sequence] = {}
        self._pending_moves: list[tuple[int, int]] = []
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
    def num_slots_used(self) -> int:
        return self._slots.used

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, request_id: str) -> Sequence | None:
        with self._lock:
            return self._running.get(request_id) or self._waiting.get(request_id)

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
            # Requests that will get a free slot at the next step do not count as queued.
            free_slots = self.max_num_seqs - self._slots.used
            if len(self._waiting) >= self.max_queued_requests + max(0, free_slots):
                raise CapacityError(
                    f"the request queue is full ({len(self._waiting)} waiting, "
                    f"max_queued_requests={self.max_queued_requests}, "
                    f"{self._slots.used}/{self.max_num_seqs} sequences running); "
                    f"retry after {self.retry_after_s:g} s or add replicas",
                    retry_after=self.retry_after_s,
                )
            seq.status = SequenceStatus.WAITING
            seq.finish_reason = None
            seq.slot = None
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
        if not 0 <= seq.num_cached_tokens < prompt_len:
            raise InvalidRequestError(
                f"num_cached_tokens={seq.num_cached_tokens} must leave at least one of the "
                f"{prompt_len} prompt tokens to compute",
                param="prompt",
            )
        if seq.num_computed_tokens != 0 or seq.output_token_ids:
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

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running request (reason ``"abort"``); None if unknown/done."""
        with self._lock:
            seq = self._running.get(request_id) or self._waiting.get(request_id)
            if seq is None:
                return None
            self._finish_locked(seq, "abort")
            return seq

    def finish(self, request_id: str, reason: str) -> None:
        """The engine decided ``request_id`` is done; frees its slot. Unknown ids are ignored."""
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
            moves = self._take_moves_locked()
            used = self._slots.used
            owners = self._slot_owner
            decode: list[Sequence] = []
            partial: list[Sequence] = []
            for i in range(used):
                seq = owners[i]
                if seq.num_computed_tokens < len(seq.prompt_token_ids):
                    partial.append(seq)
                else:
                    decode.append(seq)

            budget = self.max_batched_tokens - len(decode)
            prefill: list[PrefillChunk] = []
            # At most one sequence is ever partially prefilled (only the last chunk of a step
            # can be cut by the budget), so this loop is short.
            for seq in partial:
                if budget <= 0:
                    break
                length = min(len(seq.prompt_token_ids) - seq.num_computed_tokens, budget)
                prefill.append(PrefillChunk(seq, seq.num_computed_tokens, length))
                budget -= length
            waiting = self._waiting
            while budget > 0 and waiting and self._slots.free > 0:
                _, seq = waiting.popitem(last=False)
                slot = self._slots.allocate()
                owners[slot] = seq
                seq.slot = slot
                seq.status = SequenceStatus.RUNNING
                self._running[seq.request_id] = seq
                start = seq.num_cached_tokens
                seq.num_computed_tokens = start
                length = min(len(seq.prompt_token_ids) - start, budget)
                prefill.append(PrefillChunk(seq, start, length))
                budget -= length

            out = SchedulerOutput(
                slot_moves=moves,
                decode=decode,
                prefill=prefill,
                num_batched_tokens=self.max_batched_tokens - budget,
                num_slots_used=self._slots.used,
            )
            self._step_in_flight = True
            return out

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Record the step's results; see the module docstring. Finished sequences are skipped.

        ``sampled`` values must be Python ints (``tensor.tolist()``), not tensor elements.
        """
        running = SequenceStatus.RUNNING
        with self._lock:
            get = sampled.get
            for seq in output.decode:
                token = get(seq.request_id)
                if token is None or seq.status is not running:
                    continue  # no token: the same position runs again next step
                seq.num_computed_tokens += 1
                out_ids = seq.output_token_ids
                out_ids.append(token)
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
                    continue
                token = sampled.get(seq.request_id)
                if token is None:
                    # Re-run the last prompt token next step (as a 1-token chunk) to sample.
                    seq.num_computed_tokens = end - 1
                    continue
                seq.num_computed_tokens = end
                seq.output_token_ids.append(token)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    self._finish_locked(seq, "length")
            self._release_deferred_locked()

    # ------------------------------------------------------------------ internals (lock held)

    def _finish_locked(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.WAITING:
            del self._waiting[seq.request_id]
        elif seq.status is SequenceStatus.RUNNING:
            del self._running[seq.request_id]
            if self._step_in_flight:
                self._deferred_release.append(seq)
            else:
                self._free_slot_locked(seq)
        else:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release_deferred_locked(self) -> None:
        self._step_in_flight = False
        if not self._deferred_release:
            return
        # Highest slot first: a released slot is then never a later move's source.
        for seq in sorted(self._deferred_release, key=lambda s: s.slot, reverse=True):
            self._free_slot_locked(seq)
        self._deferred_release.clear()

    def _free_slot_locked(self, seq: Sequence) -> None:
        slot = seq.slot
        assert slot is not None and self._slot_owner[slot] is seq
        move = self._slots.release(slot)
        self._slot_owner[slot] = None
        seq.slot = None
        if move is not None:
            src, dst = move
            moved = self._slot_owner[src]
            self._slot_owner[src] = None
            self._slot_owner[dst] = moved
            moved.slot = dst
            self._pending_moves.append(move)

    def _take_moves_locked(self) -> list[tuple[int, int]]:
        """The net effect of the moves queued since the last step.

        Between two steps slots are only released, never allocated, so every source is a
        slot that ends up unused; following the chain gives each destination's original
        slot, and the reduced moves neither read nor write each other's slots.
        """
        if not self._pending_moves:
            return []
        origin: dict[int, int] = {}
        for src, dst in self._pending_moves:
            origin[dst] = origin.pop(src, src)
        self._pending_moves = []
        used = self._slots.used
        return sorted((src, dst) for dst, src in origin.items() if dst < used)
