"""From OpenAI requests to engine inputs (the LLMServer uses these, where the tokenizer is).

Pure functions (no Ray): the prompt (chat template, and a sliding window over a session's
history when it would not fit), the one context-length check (a 400 in vLLM's words, naming
the field), and ``SamplingParams`` from the request and the model's live defaults. The way
back, from engine deltas to OpenAI objects, is the ingress's: ``openai_api.outputs`` builds them
once, after the output pipeline (``output_processing``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cluster.config import ModelConfig
from cluster.errors import InvalidRequestError
from deployments.ingress.openai_api.tool_calls import llama_messages, tool_response_format
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from engine.decoding.structured import parse_response_format
from engine.types import SamplingParams, context_length_error


@dataclass(frozen=True)
class Prompt:
    """A request ready for the engine: its token ids, how many history turns were dropped and,
    for a chat, the messages the chat template rendered (what a context preview shows)."""

    token_ids: list[int]
    dropped_turns: int = 0
    messages: list[dict[str, Any]] | None = None


def chat_prompt(
    tokenizer: Any, request: ChatCompletionRequest, config: ModelConfig, history_len: int = 0
) -> Prompt:
    """Apply the chat template; drop the oldest of the first ``history_len`` (session) turns
    while the prompt and the requested output would not fit in the context."""
    plain = not request.tools and all(
        (m.role in ("user", "assistant") or (m.role == "system" and i == 0)) and not m.tool_calls
        for i, m in enumerate(request.messages)
    )
    messages = [m.as_dict() for m in request.messages] if plain else llama_messages(request)
    history_len = min(history_len, len(messages))
    want = request.max_tokens or min(config.max_tokens, config.context_length // 2)
    dropped = 0
    while True:
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        droppable = [i for i in range(history_len - dropped) if messages[i]["role"] != "system"]
        if len(ids) + want <= config.context_length or not droppable:
            return Prompt(ids, dropped, messages)
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
    """The request's sampling, falling back on the model's (live) defaults; checks the
    context length (the one check, in vLLM's words: ``engine.types.context_length_error``)."""
    error = context_length_error(prompt_len, request.max_tokens, config.context_length, prompt_field)
    if error is not None:
        raise error
    room = config.context_length - prompt_len

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    # response_format's shape was checked at the ingress; a schema that cannot be compiled is
    # a 400 from the engine's submit.
    response_format, guided = structured_request(request)
    if isinstance(request, ChatCompletionRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    return SamplingParams(
        max_tokens=request.max_tokens or min(config.max_tokens, room),
        temperature=pick(request.temperature, config.temperature),
        top_p=pick(request.top_p, config.top_p),
        top_k=pick(request.top_k, config.top_k),
        repetition_penalty=pick(request.repetition_penalty, config.repetition_penalty),
        seed=pick(request.seed, config.seed),
        stop=tuple(request.stop or ()),
        response_format=response_format,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=tuple((int(k), v) for k, v in (request.logit_bias or {}).items()),
        min_p=request.min_p or 0.0,
        min_tokens=request.min_tokens or 0,
        ignore_eos=bool(request.ignore_eos),
        skip_special_tokens=pick(request.skip_special_tokens, True),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
        logprobs=logprobs,
        guided=guided,
    )


def structured_request(request: SamplingFields) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """``(response_format, guided)`` for the engine from the one field that constrains the
    output: ``response_format``, a tool call (``tool_choice`` required or named), or vLLM's
    ``structured_outputs`` / ``guided_json`` / ``guided_choice`` / ``guided_regex`` /
    ``guided_grammar``. Two of them at once is a 400 naming both."""
    found: list[tuple[str, dict[str, Any] | None, dict[str, str] | None]] = []
    fmt = parse_response_format(request.response_format)
    if fmt is not None and fmt.constrained:
        found.append(("response_format", request.response_format, None))
    if isinstance(request, ChatCompletionRequest):
        tool = tool_response_format(request)
        if tool is not None:
            found.append((f"tool_choice={request.tool_choice if isinstance(request.tool_choice, str) else 'named'}", tool, None))
    so = request.structured_outputs
    guided_fields = {
        "guided_json": request.guided_json,
        "guided_choice": request.guided_choice,
        "guided_regex": request.guided_regex,
        "guided_grammar": request.guided_grammar,
    }
    if so is not None:
        set_fields = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) not in (None, False)]
        if len(set_fields) != 1:
            raise InvalidRequestError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {[f.rstrip('_') for f in set_fields] or 'none'}",
                param="structured_outputs",
            )
        guided_fields["guided_" + set_fields[0].rstrip("_")] = getattr(so, set_fields[0])
    for name, value in guided_fields.items():
        if value is None or value is False:
            continue
        field = f"structured_outputs.{name[7:]}" if so is not None else name
        if name == "guided_json":
            schema = _json_schema(value, field)
            found.append((field, {"type": "json_schema", "json_schema": {"name": "guided", "schema": schema}}, None))
        elif name == "guided_json_object":
            found.append((field, {"type": "json_object"}, None))
        elif name == "guided_choice":
            if not value or any(not isinstance(c, str) or not c for c in value):
                raise InvalidRequestError(f"{field} must be a list of non-empty strings", param=field)
            found.append((field, None, {"regex": "(" + "|".join(re.escape(c) for c in value) + ")"}))
        elif name == "guided_regex":
            found.append((field, None, {"regex": value}))
        else:
            found.append((field, None, {"grammar": value}))
    if len(found) > 1:
        raise InvalidRequestError(
            f"{found[0][0]} and {found[1][0]} both constrain the output; send only one of them",
            param=found[1][0].split("=")[0],
        )
    if not found:
        return request.response_format, None
    return found[0][1], found[0][2]


def _json_schema(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{field} is not valid JSON ({exc})", param=field) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{field} must be a JSON schema object", param=field)
    return value


__all__ = [
    "Prompt",
    "chat_prompt",
    "completion_prompt",
    "sampling_params",
    "structured_request",
]
