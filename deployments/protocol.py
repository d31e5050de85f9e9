"""Request and response models of the API: the OpenAI shapes plus M-AI's extensions
(``session_id``, ``output_template`` in requests; ``m_ai``, the output pipeline's report, in
responses).

The same models cross HTTP (FastAPI validates the bodies) and the Python handle
(``handle.chat.remote(ChatCompletionRequest(...))``). Requests are strict: unknown fields and
values of the wrong type are refused with the field named, as the OpenAI API does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from deployments.protocol_numbers import (
    JsonInt,
    NonNegativeJsonInt,
    PositiveJsonInt,
    bounded_int,
)

# Sessions and memory (M-AI's extensions) live in their own module; their names are also this
# module's, as every other request and response type is.
from deployments.protocol_sessions import (  # noqa: F401
    MemoriesDeleted,
    Memory,
    MemoryAdded,
    MemoryCreateRequest,
    MemoryDeleted,
    MemoryKind,
    MemoryList,
    MemorySearchRequest,
    MemoryTurnMessage,
    MemoryTurnRequest,
    MemoryUsage,
    SessionContextPreview,
    SessionCreateRequest,
    SessionDeleted,
    SessionInfo,
    SessionList,
)
from deployments.protocol_tools import (
    MAX_TOP_LOGPROBS,
    ChatToolFields,
    ChoiceLogprobs,
    CompletionLogprobs,
    SamplingExtras,
    ToolCall,
    ToolCallDelta,
    ToolCallOut,
)

MAX_STOP_SEQUENCES = 4
# More messages than any Llama 2 context holds (each costs at least a few template tokens).
MAX_MESSAGES = 1024
MAX_CHOICES = 8  # n
# How a tool's result reads in the Llama 2 prompt (a user turn: Llama 2 has no tool role).
TOOL_RESULT_FORMAT = "[result of tool call {id}{name}]\n{content}"


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# OpenAI's response_format, as the spec states it (the server reads it as a dict:
# engine.structured.parse_response_format).
RESPONSE_FORMAT_SCHEMA = {
    "oneOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
         "additionalProperties": False},
        {"type": "object", "properties": {"type": {"const": "json_object"}}, "required": ["type"],
         "additionalProperties": False},
        {
            "type": "object",
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"type": "boolean"},
                    },
                    "required": ["schema"],
                },
            },
            "required": ["type", "json_schema"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests -------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is treated as system; a tool result becomes a user turn of "
        "the Llama 2 prompt."
    )
    content: str | list[TextPart] | None = Field(
        None, description="Text; None only for an assistant message with tool_calls."
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made.")
    tool_call_id: str | None = Field(None, description="tool: the call this result answers.")

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is missing: a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, str]:
        """The message as a Llama 2 chat turn (role system, user or assistant)."""
        if self.role == "developer":
            return {"role": "system", "content": self.text()}
        if self.role == "tool":
            name = f" ({self.name})" if self.name else ""
            content = TOOL_RESULT_FORMAT.format(id=self.tool_call_id, name=name, content=self.text())
            return {"role": "user", "content": content}
        if self.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                for c in self.tool_calls
            ]
            rendered = json.dumps(calls[0] if len(calls) == 1 else calls)
            text = self.text()
            return {"role": "assistant", "content": f"{text}\n{rendered}" if text else rendered}
        return {"role": self.role, "content": self.text()}

    def stored(self) -> dict[str, Any]:
        """The message as a session keeps it: its Llama 2 turn (``as_dict``) and, for tool calls
        and results, their typed ``tool_items`` (``cluster.state.Message``), which the Responses
        API gives back as function_call / function_call_output items."""
        turn: dict[str, Any] = self.as_dict()
        if self.tool_calls:
            turn["tool_items"] = [
                {"type": "function_call", "call_id": c.id, "name": c.function.name,
                 "arguments": c.function.arguments}
                for c in self.tool_calls
            ]
        elif self.role == "tool":
            turn["tool_items"] = [
                {"type": "function_call_output", "call_id": self.tool_call_id, "output": self.text()}
            ]
        return turn


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(SamplingExtras, _Request):
    """Fields common to chat and text completions."""

    model: str = Field(description="A name from GET /v1/models.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0 is greedy; None: the model's default."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: NonNegativeJsonInt | None = Field(None, description="Extension; 0 disables it.")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="Extension; 1.0 disables it."
    )
    max_tokens: PositiveJsonInt | None = Field(
        None, description="None: the model's default, within the context."
    )
    stop: (
        Annotated[str, Field(min_length=1)]
        # at most MAX_STOP_SEQUENCES: maxItems in the spec, the validator's message for more
        | Annotated[list[Annotated[str, Field(min_length=1)]],
                    Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})]
        | None
    ) = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop strings.")
    seed: JsonInt | None = None
    n: JsonInt = Field(
        1,
        description=f"Choices to sample (1 to {MAX_CHOICES}); they share the prompt's KV.",
        json_schema_extra={"minimum": 1, "maximum": MAX_CHOICES},
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(RESPONSE_FORMAT_SCHEMA)] = Field(
        None,
        description='{"type": "json_object"}, or {"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}: decoding is constrained to JSON (that matches the '
        "schema); see docs/output.md.",
    )
    output_template: str | None = Field(
        None,
        max_length=64,
        description="Extension: render the answer with this template of the server's "
        "output.formats.templates (a stream then sends the answer at its end).",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(
                f"stop has {len(stops)} strings; at most {MAX_STOP_SEQUENCES} are allowed"
            )
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"n={value} must be greater than or equal to 1")
        if value > MAX_CHOICES:
            raise ValueError(f"n={value} must be less than or equal to {MAX_CHOICES}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(ChatToolFields, SamplingFields):
    messages: list[ChatMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description=f"With session_id: only the new turn(s). At most {MAX_MESSAGES}.",
    )
    max_completion_tokens: PositiveJsonInt | None = Field(None, description="Newer name of max_tokens.")
    session_id: str | None = Field(
        None,
        max_length=128,
        description="Extension: continue this server-side session (POST /v1/sessions).",
    )
    @model_validator(mode="after")
    def _merge_max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; send only one")
            self.max_tokens = self.max_completion_tokens
        return self



class SessionTurnRequest(ChatCompletionRequest):
    """A chat turn of the session the route's path names (``POST /v1/sessions/{id}/context``)."""

    session_id: None = Field(None, description="The path names the session: leave it out.")

    def in_session(self, session_id: str) -> ChatCompletionRequest:
        fields = {**dict(self), "session_id": session_id}  # validated already
        return ChatCompletionRequest.model_construct(self.model_fields_set | {"session_id"}, **fields)


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[NonNegativeJsonInt], Field(min_length=1)]
        # one text: maxItems in the spec, the validator's message for more
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, json_schema_extra={"maxItems": 1})]
    ) = Field(description="Text, token ids, or a list of one text (never empty).")
    logprobs: bounded_int(0, MAX_TOP_LOGPROBS) | None = Field(
        None, description="Log probabilities of the output tokens and "
        "of this many most likely alternatives."
    )
    echo: bool | None = Field(None, description="Return the prompt before the completion.")
    best_of: bounded_int(1, MAX_CHOICES) | None = Field(
        None, description="Only equal to n (the choices are not ranked)."
    )
    suffix: str | None = Field(None, description="Refused: Llama 2 has no insert mode.")

    @model_validator(mode="after")
    def _check_completion_fields(self) -> CompletionRequest:
        if self.suffix is not None:
            raise ValueError("suffix is not supported: Llama 2 has no insert (fill-in-the-middle) mode; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of={self.best_of} is not supported: the server does not rank candidates; "
                f"send best_of equal to n ({self.n}) or leave it out"
            )
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (no prompt logprobs); send one of them")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError(f"prompt holds {len(value)} texts; send one prompt per request")
            value = value[0]
        if len(value) == 0:
            raise ValueError("prompt is empty")
        return value


# -- responses ------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)


class OutputFinding(_Response):
    """A safety check's hit: where it was (offsets in the sanitized text) and what was done."""

    check: str
    category: str
    start: int
    end: int
    action: Literal["allow", "redact", "block"]


class OutputReport(_Response):
    """Extension ``m_ai`` of a processed answer: what the output pipeline found (the matched
    text itself is never reported)."""

    format: str = Field(description="text, json, markdown or a plugin's format.")
    valid: bool = Field(description="The answer parsed and validated (against the schema).")
    errors: list[str] = Field(default_factory=list)
    findings: list[OutputFinding] = Field(default_factory=list)
    metrics: dict[str, float | int | bool | None] | None = Field(
        None, description="Quality metrics (docs/output.md)."
    )
    summary: str | None = None


def _m_ai_field() -> Any:
    """On processed answers (and a stream's last chunk) only: left out of the JSON when None."""
    return Field(
        None, exclude_if=lambda value: value is None, description="Extension: the output report."
    )


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session_id: str | None = None
    m_ai: OutputReport | None = _m_ai_field()


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    m_ai: OutputReport | None = _m_ai_field()


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    m_ai: OutputReport | None = _m_ai_field()


# A streamed text completion has the same shape as the whole one (as in the OpenAI API).
CompletionChunk = CompletionResponse


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "m-ai"
    context_length: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


def parse_request(model: type[_Request], value: Any) -> Any:
    """``value`` as ``model`` (an instance passes through; a dict is validated)."""
    if isinstance(value, model):
        return value
    return model.model_validate(value)


__all__ = [name for name in dir() if name[0].isupper()] + ["parse_request", "completion_id", "now"]
