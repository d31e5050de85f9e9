"""Sessions and long-term memory over HTTP and the handle (M-AI's extensions to the OpenAI API):
request bodies validated at the boundary, and the shapes of the answers. Re-exported by
``deployments.protocol``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.protocol_numbers import MAX_EPOCH_S, JsonInt, NonNegativeJsonInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests -------------------------------------------------------------------------------


class SessionCreateRequest(_Request):
    system_prompt: str | None = Field(None, max_length=32_000)
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Whose long-term memory the session reads and feeds (within the tenant); "
        "a request's own `user` field wins. None: memory stays within the session.",
    )


# The kinds of engine.memory_extraction.KINDS (tests/unit/deployments/http/test_openapi_spec.py keeps them equal).
MemoryKind = Literal["identity", "preference", "decision", "commitment", "attribute"]


class MemoryCreateRequest(_Request):
    """``POST /v1/memories``: a fact added by hand, deduplicated like an extracted one."""

    user: str = Field(min_length=1, max_length=256, description="Whose memory (within the tenant).")
    text: str = Field(min_length=1, max_length=2_000, description="The fact, e.g. 'The user lives in Oslo.'")
    kind: MemoryKind = Field("attribute", description="What sort of fact it is.")
    importance: float | None = Field(None, ge=0.0, le=1.0, description="None: the kind's default.")
    slot: str | None = Field(
        None, max_length=128, description="A one-value-at-a-time key (e.g. 'location'): a new value supersedes."
    )
    value: str = Field("", max_length=512, description="The slot's value.")


class MemoryTurnMessage(_Request):
    role: Literal["user", "assistant"]
    content: str = Field(min_length=1, max_length=32_000)
    name: str | None = Field(
        None, min_length=1, max_length=128,
        description="Who said it; questions that name this person find what they said.",
    )


class MemoryTurnRequest(_Request):
    """``POST /v1/memories/turns``: one finished turn of a conversation held elsewhere (an
    import of past conversations), absorbed like a session's turn."""

    user: str = Field(min_length=1, max_length=256, description="Whose memory (within the tenant).")
    session_id: str = Field(min_length=1, max_length=256, description="The conversation it belongs to.")
    turn_id: NonNegativeJsonInt = Field(description="Its position in the conversation (a repeat is ignored).")
    messages: list[MemoryTurnMessage] = Field(min_length=1, max_length=64)
    at: float | None = Field(
        None, ge=0, le=MAX_EPOCH_S, description="When it was said (epoch seconds, before 2200); relative dates in it ('yesterday') "
        "resolve against it. None: now.",
    )


class MemorySearchRequest(_Request):
    """``POST /v1/memories/search``: the user's memories closest to ``query``."""

    user: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1, max_length=4_000)
    limit: JsonInt = Field(10, ge=1, le=1_000)


# -- responses ------------------------------------------------------------------------------


class SessionInfo(_Response):
    id: str
    object: Literal["session"] = "session"
    created: int
    system_prompt: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    turns: int = Field(0, description="Exchanges so far (a user turn and its reply count as one).")
    message_count: int = Field(0, description="Messages stored (the system prompt not included).")
    messages: list[dict[str, Any]] | None = Field(
        None,
        description="{role, content}; tool calls and results also carry tool_items (function_call "
        "{call_id, name, arguments} or function_call_output {call_id, output}).",
    )


class SessionList(_Response):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class SessionDeleted(_Response):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class SessionContextPreview(_Response):
    """``POST /v1/sessions/{session_id}/context``: the prompt a chat turn in the session would
    give the model now, through the chat's own path; nothing is generated or stored."""

    object: Literal["session.context"] = "session.context"
    session_id: str
    model: str
    user: str | None = Field(None, description="Whose long-term memory was read (None: memory is off).")
    memory: bool = Field(
        description="True: memory assembled the prompt (its facts, summaries and earlier "
        "conversations in the system message, then the session's recent turns); False: the "
        "session's messages through the sliding window (memory off, or its shard did not answer)."
    )
    messages: list[dict[str, str]] = Field(
        description="{role, content} as the model's chat template renders them: the system message "
        "(the session's system prompt and memory's sections), the earlier turns that fit "
        "context_length - max_tokens, then the new message(s)."
    )
    prompt_tokens: int = Field(
        description="Their token count with the model's tokenizer and chat template: the "
        "usage.prompt_tokens of the same chat turn sent now."
    )


class Memory(_Response):
    """One long-term memory of a user (docs/memory.md lists the fields)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["memory"] = "memory"
    text: str
    kind: str
    status: str


class MemoryList(_Response):
    object: Literal["list"] = "list"
    data: list[Memory]
    total: int | None = None
    has_more: bool | None = None


class MemoryAdded(_Response):
    decision: dict[str, Any]
    memory: Memory | None


class MemoryDeleted(_Response):
    id: str
    object: Literal["memory"] = "memory"
    deleted: bool = True


class MemoriesDeleted(_Response):
    object: Literal["memory.deleted_all"] = "memory.deleted_all"
    user: str
    deleted: int
    sessions: int


class MemoryUsage(_Response):
    model_config = ConfigDict(extra="allow")
    object: Literal["memory.usage"] = "memory.usage"
    tenant: str
    memories: int = 0
    bytes: int = 0
    limit_fraction: float | None = None
    warning: str | None = None


__all__ = [name for name in dir() if name[0].isupper() and name not in ("MAX_EPOCH_S", "Any", "Literal")]
