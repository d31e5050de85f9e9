"""The scheduler's records: a request as a sequence of tokens with its KV block table, a
prompt chunk of a step, and a step's plan (``engine.scheduling.scheduler`` decides them)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


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
    # Prompt tokens found in the prefix cache at the last admission (not computed again).
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # position p: table[p // block_size]
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of its full blocks
    num_registered_blocks: int = 0  # leading blocks whose keys are in the prefix cache
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output (a new list: prefer ``last_token_id`` on hot paths)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return prompt[start:end]
        return prompt[start:end] + self.output_token_ids[max(0, start - n) : end - n]

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
    def prefill_target(self) -> int:
        """Tokens to compute before decoding: the prompt, or after a preemption every token
        but the newest (which the next decode step consumes)."""
        if self.output_token_ids:
            return len(self.prompt_token_ids) + len(self.output_token_ids) - 1
        return len(self.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def num_remaining_prompt_tokens(self) -> int:
        return max(0, self.prefill_target - self.num_computed_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class PrefillChunk:
    """Run ``all_token_ids[start:start+length]`` at those positions.

    ``completes_prompt``: the chunk ends a fresh prompt, so the step samples the first output
    token from its last position (a preempted sequence's recompute samples nothing).
    """

    seq: Sequence
    start: int
    length: int
    completes_prompt: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.start + self.length)


@dataclass
class SchedulerOutput:
    decode: list[Sequence]  # each runs its last token at position num_tokens - 1
    prefill: list[PrefillChunk]
    num_batched_tokens: int
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue

    @property
    def is_empty(self) -> bool:
        return not (self.decode or self.prefill)
