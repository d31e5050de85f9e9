"""The engine's request and output types: what crosses from a caller into the engine core.

Plain dataclasses (cheap to create per request, picklable for Ray). The HTTP layer has its own
pydantic models and converts to these.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from cluster.errors import EngineDeadError, InvalidRequestError, MAIError, RequestCancelled

FinishReason = Literal["stop", "length", "abort", "error", "content_filter"]

_counter = itertools.count()


def new_request_id() -> str:
    return f"req-{os.getpid():x}-{next(_counter):x}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties on the output so far (-2..2): presence subtracts once per seen token,
    # frequency once per occurrence. logit_bias: (token id, bias) pairs added to the logits.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's extras: min_p keeps tokens with at least min_p x the top probability; before
    # min_tokens outputs, eos and stop_token_ids cannot be sampled.
    min_p: float = 0.0
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # None: no log probabilities; k >= 0: the sampled token's and the k most likely ones'
    # (the model's log-softmax, before penalties, masks and temperature).
    logprobs: int | None = None
    # vLLM's guided decoding beyond JSON: {"regex": pattern} or {"grammar": EBNF}.
    guided: dict[str, str] | None = field(default=None, hash=False)
    # OpenAI's response_format ({"type": "json_object"} or {"type": "json_schema", ...}):
    # constrained decoding (engine/decoding/structured.py). Not hashed: it holds a dict.
    response_format: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # Checked here too because the Python API may be called without the HTTP layer.
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens} must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs} must be None or in [0, 20]")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.guided is not None and (
            not isinstance(self.guided, dict) or set(self.guided) - {"regex", "grammar"}
            or len(self.guided) != 1
        ):
            raise ValueError(f"guided={self.guided!r} must be {{'regex': ...}} or {{'grammar': ...}}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.response_format is not None and (
            not isinstance(self.response_format, dict)
            or self.response_format.get("type") not in ("text", "json_object", "json_schema")
        ):
            raise ValueError(
                f"response_format={self.response_format!r} must be a dict whose type is text, "
                "json_object or json_schema"
            )

    @property
    def constrained(self) -> bool:
        """Whether decoding follows a grammar (a JSON response_format, or ``guided``)."""
        if self.guided is not None:
            return True
        return self.response_format is not None and self.response_format.get("type") != "text"

    @property
    def processes_logits(self) -> bool:
        """Whether logits change before sampling beyond temperature/top-k/top-p."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p
            or self.min_tokens
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log probability and the ``top`` most likely alternatives
    (``(token_id, logprob)``, most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """One streamed piece of a request's output (a delta), or its final record.

    ``text`` holds only complete characters: a multi-byte character split over tokens is
    held back until its last byte arrives. ``finished`` is set on the last piece.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # Seconds since the request arrived at the engine, for time-to-first-token accounting.
    arrival_time: float = 0.0
    first_token_time: float | None = None
    # One entry per token of ``token_ids`` when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def joined_logprobs(outputs: list[RequestOutput]) -> list[TokenLogprob] | None:
    """The logprobs of consecutive deltas, concatenated (None when none carries any)."""
    if all(o.logprobs is None for o in outputs):
        return None
    return [lp for o in outputs for lp in (o.logprobs or ())]


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """Fold consecutive deltas of one request into one: token ids and text concatenated,
    the first delta's arrival and first-token times, the last one's finish and counts."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]
    return RequestOutput(
        last.request_id,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
        arrival_time=first.arrival_time,
        first_token_time=next((o.first_token_time for o in outputs if o.first_token_time), None),
        logprobs=joined_logprobs(outputs),
    )


def context_length_error(
    prompt_len: int, max_tokens: int | None, context_length: int, prompt_field: str = "prompt"
) -> InvalidRequestError | None:
    """The error for a prompt (plus ``max_tokens``) that does not fit the context, in vLLM's
    words (``entrypoints/openai/serving_engine.py``, ``_validate_input``), so that clients that
    read the limits out of vLLM's message read ours too; None when it fits."""
    room = context_length - prompt_len
    if room < 1:
        return InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"request has {prompt_len} input tokens. Please reduce the length of the input "
            "messages.",
            param=prompt_field,
        )
    if max_tokens is not None and max_tokens > room:
        return InvalidRequestError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {context_length} tokens and your request has "
            f"{prompt_len} input tokens ({max_tokens} > {context_length} - {prompt_len}).",
            param="max_tokens",
        )
    return None


@dataclass(frozen=True)
class OutputSink:
    """Where one request's outputs go. With ``loop``, ``put`` runs on that asyncio loop (the
    engine hands each step's outputs to a loop in one call); without, on the engine's thread."""

    put: Callable[[RequestOutput], None]
    loop: asyncio.AbstractEventLoop | None = None


def output_failure(out: RequestOutput) -> MAIError | None:
    """The error a final output that ended in failure rather than in text stands for."""
    if out.finish_reason == "error":
        return EngineDeadError(f"the engine failed this request: {out.error or 'unknown error'}")
    if out.finish_reason == "abort":
        return RequestCancelled("the request was cancelled before it finished")
    return None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for health, metrics and admission control."""

    running: int
    waiting: int
    max_num_seqs: int
    kv_slots_used: int
    kv_slots_total: int
    steps: int
    generated_tokens: int
    prefix_cache_hit_rate: float = 0.0  # of prompt tokens looked up
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    kv_blocks_used: int = 0  # paged KV cache blocks held by running sequences
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    alive: bool = True


@runtime_checkable
class RequestStream(Protocol):
    """What ``LLMEngine.submit`` returns: iterate the deltas, or cancel."""

    request_id: str

    def __iter__(self) -> Iterator[RequestOutput]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class AsyncEngineClient(Protocol):
    """The engine as the serving layer sees it (the real engine and the fake one both fit).

    ``generate`` yields deltas until one has ``finish_reason``; closing the iterator early
    (client disconnect) cancels the request and frees its slot at once: that is the one way
    to cancel. Besides these members, an engine class offers ``from_config(config,
    **options)``; ``load_tokenizer(config, **options)``, the tokenizer ``from_config`` would
    use (the serving layer templates and counts prompts with it, loaded where it runs rather
    than fetched from rank 0); and ``uses_rank_workers``: True when every rank loads a
    ``TPWorker`` and rank 0 runs the engine over it (``from_worker``), False when rank 0
    alone makes it (``from_config``).
    """

    tokenizer: Any
    uses_rank_workers: bool

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> EngineStats: ...

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` when the engine or any rank is gone."""
