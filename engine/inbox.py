"""What other threads put into the engine core's inbox; the core loop takes them at the next
step boundary (``engine.core``). Typed, so that the loop and the sibling bookkeeping
(``engine.scheduling.siblings``) read fields by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.types import OutputSink, SamplingParams


@dataclass(frozen=True)
class AddRequest:
    """A request to admit. ``share_prompt_of``: the leader of ``n`` samples of this prompt,
    whose KV this one shares (``engine.scheduling.siblings``)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: OutputSink
    arrival: float
    grammar: Any = None  # the compiled grammar of a constrained request
    share_prompt_of: str | None = None
    resumed: int = 0  # trailing prompt ids that are the request's own earlier output


@dataclass(frozen=True)
class AbortRequest:
    """A request to cancel (its slot is free from the next step on)."""

    request_id: str


InboxItem = AddRequest | AbortRequest

__all__ = ["AddRequest", "AbortRequest", "InboxItem"]
