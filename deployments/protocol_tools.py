"""The OpenAI shapes of tools, tool calls and log probabilities (requests and responses),
and the request fields OpenAI defines that M-AI accepts without acting on them.

Kept apart from ``deployments/protocol.py`` (which imports these) so that each stays one
screenful per concept. Requests are strict (unknown fields refused), responses lenient.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.protocol_numbers import NonNegativeJsonInt, bounded_int

MAX_TOOLS = 128  # OpenAI's limit
MAX_TOP_LOGPROBS = 20


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


# -- request fields of chat and text completions (mixed into deployments.protocol) ------------


class SamplingExtras(BaseModel):
    """Fields of chat and text completions beyond the core sampling ones: OpenAI's that do not
    change a self-hosted model's answer (accepted, ignored), ``logit_bias``, and vLLM's."""

    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100], added to the logits."
    )
    # OpenAI fields that do not change the answer of a self-hosted model: accepted, ignored.
    service_tier: str | None = Field(None, description="Accepted and ignored (one tier here).")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(
        None, description="Accepted and ignored (chat completions are not kept for listing)."
    )
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted and ignored: prefixes are cached automatically."
    )
    prompt_cache_retention: str | None = Field(None, description="Accepted and ignored.")
    # vLLM's extensions, with vLLM's meaning (docs/api.md).
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Extension (vLLM).")
    min_tokens: NonNegativeJsonInt | None = Field(None, description="Extension (vLLM).")
    ignore_eos: bool | None = Field(None, description="Extension (vLLM).")
    skip_special_tokens: bool | None = Field(None, description="Extension (vLLM).")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="Extension (vLLM).")
    include_stop_str_in_output: bool | None = Field(None, description="Extension (vLLM).")
    structured_outputs: StructuredOutputs | None = Field(None, description="Extension (vLLM).")
    guided_json: dict[str, Any] | str | None = Field(None, description="Extension (vLLM).")
    guided_choice: list[str] | None = Field(None, min_length=1, description="Extension (vLLM).")
    guided_regex: str | None = Field(None, description="Extension (vLLM).")
    guided_grammar: str | None = Field(None, description="Extension (vLLM).")

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias key {key!r} is not a token id (a non-negative integer)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}]={bias} is outside [-100, 100]")
        return value


class ChatToolFields(BaseModel):
    """Chat-only fields: log probabilities, tools, and OpenAI's fields that are refused here
    (with the reason) or accepted and ignored."""

    logprobs: bool | None = Field(None, description="Return each output token's log probability.")
    top_logprobs: bounded_int(0, MAX_TOP_LOGPROBS) | None = Field(
        None, description="With logprobs: the most likely alternatives."
    )
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="Default true.")
    functions: list[FunctionDefinition] | None = Field(
        None, max_length=MAX_TOOLS, description="Deprecated form of tools."
    )
    function_call: Literal["none", "auto"] | dict[str, str] | None = Field(
        None, description="Deprecated form of tool_choice."
    )
    prediction: PredictionContent | None = Field(None, description="Accepted and ignored.")
    modalities: list[Literal["text", "audio"]] | None = Field(None, description="Only text.")
    audio: dict[str, Any] | None = Field(None, description="Refused: text only.")
    reasoning_effort: str | None = Field(None, description="Refused: not a reasoning model.")
    verbosity: str | None = Field(None, description="Refused: for reasoning models only.")
    web_search_options: dict[str, Any] | None = Field(None, description="Refused: no web search.")


    @model_validator(mode="after")
    def _check_chat_fields(self) -> ChatToolFields:
        refused = {
            "audio": "audio output needs an audio model; this server's Llama 2 models write text",
            "reasoning_effort": "it applies to reasoning models only; Llama 2 is not one",
            "verbosity": "it applies to reasoning models only; Llama 2 is not one",
            "web_search_options": "this server has no web search tool",
        }
        for name, why in refused.items():
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported: {why}; leave it out")
        if self.modalities and "audio" in self.modalities:
            raise ValueError("modalities=['audio'] is not supported: the models write text only")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.functions is not None:
            if self.tools is not None:
                raise ValueError("functions and tools are both given; send only tools (functions is its deprecated form)")
            self.tools = [ToolDefinition(type="function", function=f) for f in self.functions]
            self.functions = None
        if self.function_call is not None:
            if self.tool_choice is not None:
                raise ValueError("function_call and tool_choice are both given; send only tool_choice (function_call is its deprecated form)")
            fc = self.function_call
            self.tool_choice = fc if isinstance(fc, str) else NamedToolChoice(
                type="function", function=NamedFunction(name=str(fc.get("name", "")))
            )
            self.function_call = None
        choice = self.tool_choice
        if choice is not None and not self.tools and choice != "none":
            raise ValueError("tool_choice is only allowed when tools are specified")
        if choice is not None and not isinstance(choice, str):
            name = choice.function.name
            if name not in {t.function.name for t in self.tools or ()}:
                raise ValueError(f"tool_choice names function {name!r}, which is not among tools")
        return self

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named (how tools apply to this request)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    @property
    def named_tool(self) -> str | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return None
        return choice.function.name


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


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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


__all__ = [name for name in dir() if name[0].isupper()] + ["tool_call_id"]
