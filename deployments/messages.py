"""The messages a generation request travels in, from the ingress to a model replica and back.

The ingress validates the client's body once (pydantic, at the HTTP or handle boundary),
resolves the tenant and the session's context, and builds one ``ModelRequest``. The
LLMServer turns it into token ids and ``SamplingParams`` (where the tokenizer and the model's
live defaults are: the context length is checked there, in vLLM's words) and streams the
engine's typed deltas back, one ``ChoiceDelta`` per delta of a choice (``n``); the ingress
runs them through its output pipeline as text and builds the OpenAI objects once, after it.
One request id names the request at every hop (choice ``i > 0`` of ``n``: ``<id>-<i>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.protocol import ChatCompletionRequest, CompletionRequest
from engine.types import RequestOutput, new_request_id


@dataclass
class SessionContext:
    """What a request carries of its session, to the model and back to the store."""

    request: ChatCompletionRequest | CompletionRequest  # what the model gets (session_id cleared)
    history_len: int = 0  # leading session messages in ``request`` (the sliding-window path)
    user: str | None = None  # whose memory (memory on)
    recall: Any = None  # a MemoryRecall: the LLMServer assembles the prompt from it
    system_prompt: str | None = None
    stored_count: int | None = None  # the session's message count once the turn is stored


@dataclass(frozen=True)
class ModelRequest:
    """One generation request as a model replica receives it (see the module docstring)."""

    context: SessionContext
    tenant: str
    stream: bool  # deltas paced while it runs; else one merged output per choice at the end
    request_id: str = field(default_factory=new_request_id)
    sent_at: float | None = None  # wall clock at the ingress, for the queue-time stage
    # A resumption after the replica that streamed this request died (serving.migration):
    # choice index -> the output token ids its client already has. Only the choices listed
    # are generated (a finished choice is not); None: a fresh request.
    resume: dict[int, list[int]] | None = None
    attempt: int = 0  # resumptions so far (engine ids of a resumption differ from the first)

    @property
    def body(self) -> ChatCompletionRequest | CompletionRequest:
        return self.context.request

    def choice_id(self, index: int) -> str:
        """The engine's id of choice ``index`` (the first choice has the request's id)."""
        rid = self.request_id if not self.attempt else f"{self.request_id}-m{self.attempt}"
        return rid if index == 0 else f"{rid}-{index}"


@dataclass
class ChoiceDelta:
    """One engine delta of choice ``index``, as the LLMServer streams it back.

    ``token_texts``: the text and UTF-8 bytes of every token id in ``output.logprobs`` (only
    when logprobs were asked for: the tokenizer is at the replica). ``echo``: the prompt's
    text on a choice's first delta, for a completion with ``echo``.
    """

    index: int
    output: RequestOutput
    token_texts: dict[int, tuple[str, list[int]]] | None = None
    echo: str = ""


__all__ = ["ChoiceDelta", "ModelRequest", "SessionContext"]
