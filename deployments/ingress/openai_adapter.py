"""From OpenAI requests to engine inputs, and from engine outputs to OpenAI responses.

Pure functions and small builders (no Ray): the prompt (chat template, and a sliding window
over a session's history when it would not fit), the context-length checks that answer 400
naming the field, ``SamplingParams`` from the request and the model's live defaults, and the
response or chunk objects built from ``RequestOutput`` deltas. (The output pipeline runs in
the ingress, on these responses: ``deployments/ingress/output_processing.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import ModelConfig
from cluster.errors import InvalidRequestError
from deployments.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
    Usage,
    completion_id,
    now,
)
from engine.decoding.structured import parse_response_format
from engine.types import RequestOutput, SamplingParams, output_failure


@dataclass(frozen=True)
class Prompt:
    """A request ready for the engine: its token ids and how many history turns were dropped."""

    token_ids: list[int]
    dropped_turns: int = 0


def chat_prompt(
    tokenizer: Any, request: ChatCompletionRequest, config: ModelConfig, history_len: int = 0
) -> Prompt:
    """Apply the chat template; drop the oldest of the first ``history_len`` (session) turns
    while the prompt and the requested output would not fit in the context."""
    messages = [m.as_dict() for m in request.messages]
    want = request.max_tokens or min(config.max_tokens, config.context_length // 2)
    dropped = 0
    while True:
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        droppable = [i for i in range(history_len - dropped) if messages[i]["role"] != "system"]
        if len(ids) + want <= config.context_length or not droppable:
            return Prompt(ids, dropped)
        # Drop a user turn with the answer that follows it, so roles keep alternating.
        first = droppable[0]
        n = (
            2
            if first + 1 < history_len - dropped and messages[first + 1]["role"] == "assistant"
            else 1
        )
        del messages[first : first + n]
        dropped += n


def completion_prompt(tokenizer: Any, request: CompletionRequest) -> Prompt:
    prompt = request.prompt
    if isinstance(prompt, str):
        return Prompt(list(tokenizer.encode(prompt, add_bos=True)))
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and any(not 0 <= t < vocab for t in prompt):
        raise InvalidRequestError(
            f"prompt holds token ids outside the vocabulary [0, {vocab})", param="prompt"
        )
    return Prompt(list(prompt))


def sampling_params(
    request: SamplingFields, config: ModelConfig, prompt_len: int, prompt_field: str
) -> SamplingParams:
    """The request's sampling, falling back on the model's (live) defaults; checks the context."""
    # In vLLM's words (entrypoints/openai/serving_engine.py, _validate_input), so that clients
    # that read the limits out of vLLM's message read ours too.
    ctx = config.context_length
    room = ctx - prompt_len
    if room < 1:
        raise InvalidRequestError(
            f"This model's maximum context length is {ctx} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            param=prompt_field,
        )
    if request.max_tokens is not None and request.max_tokens > room:
        raise InvalidRequestError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {request.max_tokens}. "
            f"This model's maximum context length is {ctx} tokens and your request has "
            f"{prompt_len} input tokens ({request.max_tokens} > {ctx} - {prompt_len}).",
            param="max_tokens",
        )

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    # A bad shape is a 400 here; a schema that cannot be compiled, one from the engine's submit.
    parse_response_format(request.response_format)
    return SamplingParams(
        max_tokens=request.max_tokens or min(config.max_tokens, room),
        temperature=pick(request.temperature, config.temperature),
        top_p=pick(request.top_p, config.top_p),
        top_k=pick(request.top_k, config.top_k),
        repetition_penalty=pick(request.repetition_penalty, config.repetition_penalty),
        seed=pick(request.seed, config.seed),
        stop=tuple(request.stop or ()),
        response_format=request.response_format,
    )


def check_output(out: RequestOutput) -> None:
    """Raise for an output that ended in failure rather than in text."""
    failure = output_failure(out)
    if failure is not None:
        raise failure


def completion_tokens(out: RequestOutput, streamed_ids: int) -> int:
    return out.completion_tokens or streamed_ids


class ChatChunks:
    """Builds the chunks of one streamed chat completion."""

    def __init__(self, model: str, prompt_tokens: int, include_usage: bool) -> None:
        self.id = completion_id("chatcmpl")
        self.created = now()
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.sent_role = False
        self.token_ids = 0

    def chunk(self, out: RequestOutput) -> ChatCompletionChunk | None:
        """The chunk for ``out`` (None when it carries nothing a client would see)."""
        check_output(out)
        self.token_ids += len(out.token_ids)
        if not out.text and out.finish_reason is None and self.sent_role:
            return None
        delta = DeltaMessage(role=None if self.sent_role else "assistant", content=out.text)
        self.sent_role = True
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=out.finish_reason)],
        )

    def usage_chunk(self, last: RequestOutput) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=Usage.of(self.prompt_tokens, completion_tokens(last, self.token_ids)),
        )


class CompletionChunks:
    """Builds the chunks of one streamed text completion."""

    def __init__(self, model: str, prompt_tokens: int, include_usage: bool) -> None:
        self.id = completion_id("cmpl")
        self.created = now()
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.token_ids = 0

    def chunk(self, out: RequestOutput) -> CompletionResponse | None:
        check_output(out)
        self.token_ids += len(out.token_ids)
        if not out.text and out.finish_reason is None:
            return None
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
        )

    def usage_chunk(self, last: RequestOutput) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=Usage.of(self.prompt_tokens, completion_tokens(last, self.token_ids)),
        )


def chat_response(out: RequestOutput, model: str, prompt_tokens: int) -> ChatCompletionResponse:
    """The whole answer from the request's merged output."""
    check_output(out)
    return ChatCompletionResponse(
        id=completion_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[
            ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)
        ],
        usage=Usage.of(prompt_tokens, completion_tokens(out, len(out.token_ids))),
    )


def completion_response(out: RequestOutput, model: str, prompt_tokens: int) -> CompletionResponse:
    check_output(out)
    return CompletionResponse(
        id=completion_id("cmpl"),
        created=now(),
        model=model,
        choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
        usage=Usage.of(prompt_tokens, completion_tokens(out, len(out.token_ids))),
    )


__all__ = [
    "Prompt",
    "chat_prompt",
    "completion_prompt",
    "sampling_params",
    "check_output",
    "ChatChunks",
    "CompletionChunks",
    "chat_response",
    "completion_response",
]
