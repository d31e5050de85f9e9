"""The OpenAI shapes of tools, tool calls and log probabilities (requests and responses),
and the request fields OpenAI defines that M-AI accepts without acting on them.

Kept apart from ``deployments/protocol.py`` (which imports these) so that each stays one
screenful per concept. Requests are strict (unknown fields refused), responses lenient.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOOLS = 128  # OpenAI's limit


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests -------------------------------------------------------------------------------


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments; None: no arguments."
    )
    strict: bool | None = Field(
        None, description="Accepted; arguments always match the schema when decoding is constrained."
    )


class ToolDefinition(_Request):
    type: Literal["function"] = Field(
        description="Only function tools: the server has no built-in tools (web search, files)."
    )
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class PredictionContent(_Request):
    """``prediction``: a predicted output lets OpenAI answer faster; ignoring it changes
    nothing in the answer, so it is accepted and ignored."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="An EBNF (GBNF) grammar with rule root.")
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


# -- responses ------------------------------------------------------------------------------


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    """A chat choice's ``logprobs``: one entry per output token."""

    content: list[TokenLogprobEntry] | None = None
    refusal: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(_Response):
    """A text completion choice's ``logprobs`` (the legacy shape)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


__all__ = [name for name in dir() if name[0].isupper()]
