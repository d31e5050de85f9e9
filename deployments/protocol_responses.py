"""Request models of the Responses API (``/v1/responses``, ``/v1/conversations``) and of
``/v1/embeddings``, in OpenAI's shapes. Responses are plain dicts in OpenAI's shapes built by
``deployments.responses.api`` (the official SDK parses them).

Strict like every request here: unknown fields are refused; fields OpenAI defines that cannot
apply to a self-hosted Llama 2 are accepted and ignored where OpenAI's semantics allow it,
else refused with the reason (see docs/api.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.protocol_numbers import PositiveJsonInt, bounded_int

MAX_INPUT_ITEMS = 1024
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseFunctionTool(_Request):
    type: Literal["function"] = Field(
        description="Only function tools: this server has no built-in tools (web search, files)."
    )
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedTool(_Request):
    type: Literal["function"]
    name: str


class ResponseTextConfig(_Request):
    format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        '"name", "schema", "strict"}.'
    )
    verbosity: str | None = Field(None, description="Refused: for reasoning models only.")


class ConversationRef(_Request):
    id: str


class ResponseCreateRequest(_Request):
    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]], Field(min_length=1)] = Field(
        description="Text, or items: messages {role, content}, function_call, "
        "function_call_output."
    )
    instructions: str | None = Field(
        None, description="A system message for this response only (not carried over)."
    )
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = Field(
        None, description="Continue this conversation (POST /v1/conversations)."
    )
    store: bool = Field(True, description="False: nothing is kept; the id cannot be retrieved.")
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_output_tokens: PositiveJsonInt | None = None
    tools: list[ResponseFunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseTextConfig | None = None
    user: str | None = Field(None, max_length=256, description="Whose memory the session feeds.")
    metadata: dict[str, str] | None = Field(None, description="Kept with the response.")
    truncation: Literal["auto", "disabled"] | None = Field(
        None,
        description="disabled (the default): a chain that does not fit the context is a 400; "
        "auto: the oldest items after instructions are dropped until it fits.",
    )
    include: list[str] | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored.")
    top_logprobs: bounded_int(0, 20) | None = Field(None, description="Refused in this version.")
    max_tool_calls: PositiveJsonInt | None = Field(None, description="Accepted: at most 4 per response.")
    reasoning: dict[str, Any] | None = Field(None, description="Refused: not a reasoning model.")
    background: bool | None = Field(None, description="Refused when true.")
    prompt: dict[str, Any] | None = Field(None, description="Refused: no stored prompt templates.")

    @model_validator(mode="after")
    def _check(self) -> ResponseCreateRequest:
        if self.previous_response_id and self.conversation is not None:
            raise ValueError("previous_response_id and conversation are both given; send one of them")
        if self.reasoning:
            raise ValueError("reasoning is not supported: Llama 2 is not a reasoning model; leave it out")
        if self.background:
            raise ValueError("background=true is not supported: responses run in the request; leave it out")
        if self.prompt is not None:
            raise ValueError("prompt is not supported: this server keeps no prompt templates; send input")
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs is not supported on /v1/responses; use /v1/chat/completions")
        if self.text is not None and self.text.verbosity is not None:
            raise ValueError("text.verbosity is not supported: it applies to reasoning models only")
        if isinstance(self.input, list) and not 1 <= len(self.input) <= MAX_INPUT_ITEMS:
            raise ValueError(f"input must hold 1 to {MAX_INPUT_ITEMS} items")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input is empty")
        return self

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c if isinstance(c, str) or c is None else c.id


class ConversationCreateRequest(_Request):
    items: list[dict[str, Any]] | None = Field(None, max_length=20, description="At most 20.")
    metadata: dict[str, str] | None = None


class ConversationItemsRequest(_Request):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=20)


class EmbeddingRequest(_Request):
    model: str
    # Token ids parse, so that the validator can refuse them with a message that says why;
    # the spec documents only what is accepted (one text, or 1 to MAX_EMBEDDING_INPUTS texts).
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or a list of 1 to 2,048 texts (token ids are refused with a 400: they "
        "are another tokenizer's).",
        json_schema_extra=lambda schema: schema.update(anyOf=[
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1,
             "maxItems": MAX_EMBEDDING_INPUTS},
        ]),
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveJsonInt | None = Field(None, description="Only the model's own dimension.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingRequest:
        value = self.input
        if isinstance(value, list):
            if not value:
                raise ValueError("input is empty")
            if len(value) > MAX_EMBEDDING_INPUTS:
                raise ValueError(f"input holds {len(value)} texts; at most {MAX_EMBEDDING_INPUTS}")
            if not isinstance(value[0], str):
                raise ValueError(
                    "input holds token ids; send text (token ids are specific to a tokenizer, "
                    "and this embedding model's is not OpenAI's). LangChain: "
                    "OpenAIEmbeddings(check_embedding_ctx_length=False)"
                )
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


__all__ = [name for name in dir() if name[0].isupper()]
