"""The state of a conversation session, its log records, and how old data is upgraded.

``ModelState`` is everything the server keeps about one session; ``LogRecord`` is one durable
change to it (create, append a turn, update settings, delete). ``apply_record`` is the one
state transition, used both live and on replay, and it is idempotent: a record whose log
position (``lsn``) the session has already seen, or a turn id it already holds, changes
nothing. Snapshots and log records carry ``schema_version``; ``upgrade`` runs the registered
migrations to turn older data into the current shape before validation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.errors import CheckpointError

STATE_SCHEMA_VERSION = 2
ROLES = ("system", "user", "assistant")
SESSION_ID_RE = re.compile(r"^sess-[A-Za-z0-9_-]{16,128}$")
RECENT_REQUEST_IDS = 32  # retried appends carrying one of these ids are not applied twice

Role = Literal["system", "user", "assistant"]


class _StateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionLimits(BaseModel):
    """Limits of one shard; breaking one is an ``InvalidRequestError`` that names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_sessions: int = Field(100_000, ge=1, description="Sessions one shard holds.")
    max_sessions_per_tenant: int = Field(
        1_000, ge=1, description="Sessions of one tenant per shard."
    )
    max_turns_per_session: int = Field(
        1_000, ge=1, description="Appends (turns) one session takes."
    )
    max_messages_per_turn: int = Field(64, ge=1, description="Messages in one append.")
    max_message_chars: int = Field(200_000, ge=1, description="Characters of one message.")
    ttl_s: float | None = Field(
        7 * 86_400.0,
        gt=0,
        description="Idle time after which GC archives then deletes a session; None keeps them.",
    )
    archive_retention_s: float | None = Field(
        30 * 86_400.0,
        gt=0,
        description="Age after which GC removes archive files; None keeps them.",
    )


class FunctionCallItem(_StateModel):
    """A call the model made (an assistant message), as the Responses API names it."""

    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class FunctionCallOutputItem(_StateModel):
    """A tool's result for one call (a user message of the Llama 2 prompt)."""

    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str


ToolItem = Annotated[FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


class Message(_StateModel):
    role: Role
    content: str
    token_count: int = Field(0, ge=0, description="Tokens of the content; 0 when not counted.")
    timestamp: float = Field(ge=0, description="Unix time the turn was appended.")
    turn_id: int = Field(ge=0, description="The append (turn) this message belongs to.")
    tool_items: list[ToolItem] | None = Field(
        None,
        description="The typed tool calls of an assistant message, or the tool result a user "
        "message carries; ``content`` is their text as the model reads it.",
    )

    @model_validator(mode="after")
    def _tool_items_fit_the_role(self) -> Message:
        for item in self.tool_items or ():
            want = "assistant" if item.type == "function_call" else "user"
            if self.role != want:
                raise ValueError(f"a {item.type} item belongs to a {want} message, not {self.role}")
        return self

    def as_turn(self) -> dict[str, Any]:
        """``{"role", "content"}``, with ``tool_items`` when the message has them."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_items:
            turn["tool_items"] = [item.model_dump() for item in self.tool_items]
        return turn


class ConversationContext(_StateModel):
    system_prompt: str | None = None
    messages: list[Message] = Field(default_factory=list)

    @model_validator(mode="after")
    def _turns_in_order(self) -> ConversationContext:
        last = -1
        for i, message in enumerate(self.messages):
            if message.turn_id < last:
                raise ValueError(
                    f"messages[{i}].turn_id={message.turn_id} comes after turn {last}; turn ids "
                    f"must not decrease"
                )
            last = message.turn_id
        return self


class ModelParameters(_StateModel):
    """Sampling and model settings of a session; None means the model's default."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=4)

    def merged(self, overrides: ModelParameters | dict[str, Any] | None) -> ModelParameters:
        """These settings with ``overrides`` on top (a None in the overrides changes nothing)."""
        if overrides is None:
            return self
        if isinstance(overrides, dict):
            overrides = ModelParameters.model_validate(overrides)
        changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
        return self.model_copy(update=changes)


class ResourceUsage(_StateModel):
    """Totals of a session. As a turn's delta: tokens and compute add; KV bytes replace."""

    tokens_in: int = Field(0, ge=0)
    tokens_out: int = Field(0, ge=0)
    kv_bytes_held: int = Field(0, ge=0, description="KV cache bytes the session holds now.")
    compute_s: float = Field(0.0, ge=0.0)

    def add(self, delta: ResourceUsage) -> None:
        self.tokens_in += delta.tokens_in
        self.tokens_out += delta.tokens_out
        self.compute_s += delta.compute_s
        self.kv_bytes_held = delta.kv_bytes_held


class TurnMetrics(_StateModel):
    turn_id: int = Field(ge=0)
    ttft_ms: float | None = Field(None, ge=0, description="Time to first token.")
    tpot_ms: float | None = Field(None, ge=0, description="Time per output token.")
    e2e_ms: float | None = Field(None, ge=0, description="End-to-end latency of the turn.")


class ModelState(_StateModel):
    """Everything the server keeps about one conversation session."""

    schema_version: int = STATE_SCHEMA_VERSION
    session_id: str
    tenant: str = Field(min_length=1, max_length=256)
    user: str | None = Field(None, max_length=256)
    conversation_context: ConversationContext = Field(default_factory=ConversationContext)
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)
    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage)
    performance_metrics: list[TurnMetrics] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    turn_count: int = Field(0, ge=0, description="Turns appended so far (the next turn id).")
    request_ids: list[str] = Field(default_factory=list, description="Ids of the latest appends.")
    last_lsn: int = Field(0, ge=0, description="Log position of the last change applied.")
    created_at: float = Field(ge=0)
    updated_at: float = Field(ge=0)

    @field_validator("schema_version")
    @classmethod
    def _current_version(cls, value: int) -> int:
        if value != STATE_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version={value} is not {STATE_SCHEMA_VERSION}; load old data through "
                f"upgrade() (cluster.state migrations)"
            )
        return value

    @field_validator("session_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not SESSION_ID_RE.match(value):
            raise ValueError(
                f"session_id={value!r} is malformed; ids look like 'sess-' + 16-128 of [A-Za-z0-9_-]"
            )
        return value

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        if any(ord(c) < 32 for c in value):
            raise ValueError(f"tenant={value!r} contains control characters; use printable text")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelState:
        if self.updated_at < self.created_at:
            raise ValueError(
                f"updated_at={self.updated_at} is before created_at={self.created_at}; fix the clock "
                f"or the data"
            )
        messages = self.conversation_context.messages
        if messages and messages[-1].turn_id >= self.turn_count:
            raise ValueError(
                f"turn_count={self.turn_count} but a message has turn_id={messages[-1].turn_id}; "
                f"turn_count must exceed every turn id"
            )
        return self

    def context_messages(self) -> list[dict[str, str]]:
        """The system prompt (if any) then every message, as ``{"role", "content"}``."""
        ctx = self.conversation_context
        head = [{"role": "system", "content": ctx.system_prompt}] if ctx.system_prompt else []
        return head + [{"role": m.role, "content": m.content} for m in ctx.messages]

    def summary(self, with_messages: bool = False) -> dict[str, Any]:
        """The shape the ingress's session client (``deployments.ingress.stores.sessions``) returns: ``turns``
        counts exchanges (appends: a user message and its reply are one), ``message_count``
        the messages."""
        out: dict[str, Any] = {
            "id": self.session_id,
            "tenant": self.tenant,
            "user": self.user,
            "created": int(self.created_at),
            "updated": self.updated_at,
            "system_prompt": self.conversation_context.system_prompt,
            "metadata": dict(self.metadata),
            "model_parameters": self.model_parameters.model_dump(exclude_none=True),
            "turns": self.turn_count,
            "message_count": len(self.conversation_context.messages),
            "turn_count": self.turn_count,
        }
        if with_messages:
            out["messages"] = [m.as_turn() for m in self.conversation_context.messages]
        return out


# -- log records ----------------------------------------------------------------------------


class CreateOp(_StateModel):
    kind: Literal["create"] = "create"
    state: ModelState


class AppendOp(_StateModel):
    kind: Literal["append"] = "append"
    turn_id: int = Field(ge=0)
    messages: list[Message] = Field(min_length=1)
    request_id: str | None = Field(None, max_length=256)
    usage: ResourceUsage | None = None
    metrics: TurnMetrics | None = None


class UpdateOp(_StateModel):
    kind: Literal["update"] = "update"
    system_prompt: str | None = None
    model_parameters: ModelParameters | None = Field(None, description="Replaces the old ones.")
    metadata: dict[str, str] | None = None
    user: str | None = None
    clear: list[Literal["system_prompt", "user"]] = Field(default_factory=list)


class DeleteOp(_StateModel):
    kind: Literal["delete"] = "delete"
    reason: Literal["user", "ttl"] = "user"


Op = Annotated[CreateOp | AppendOp | UpdateOp | DeleteOp, Field(discriminator="kind")]


class LogRecord(_StateModel):
    lsn: int = Field(ge=1, description="Position in the shard's log; increases by commit order.")
    ts: float = Field(ge=0, description="Unix time of the append; never decreases within a shard.")
    session_id: str
    tenant: str
    op: Op


ApplyOutcome = Literal["applied", "duplicate", "missing"]


def apply_record(sessions: dict[str, ModelState], record: LogRecord) -> ApplyOutcome:
    """Apply ``record`` to ``sessions`` in place, unless it was applied before.

    ``duplicate``: the session already reflects this log position (or holds this turn id).
    ``missing``: the session does not exist (deleted later, or the create was never logged).
    """
    op, sid = record.op, record.session_id
    state = sessions.get(sid)
    if isinstance(op, CreateOp):
        if state is not None:
            return "duplicate"
        state = op.state  # records are not reused after they are applied: no copy
        state.last_lsn = record.lsn
        sessions[sid] = state
        return "applied"
    if state is None:
        return "missing"
    if record.lsn <= state.last_lsn or state.tenant != record.tenant:
        return "duplicate"
    if isinstance(op, AppendOp):
        if op.turn_id < state.turn_count:
            return "duplicate"
        state.conversation_context.messages.extend(op.messages)
        state.turn_count = op.turn_id + 1
        if op.usage is not None:
            state.resource_usage.add(op.usage)
        if op.metrics is not None:
            state.performance_metrics.append(op.metrics)
        if op.request_id is not None:
            state.request_ids = (state.request_ids + [op.request_id])[-RECENT_REQUEST_IDS:]
    elif isinstance(op, UpdateOp):
        ctx = state.conversation_context
        if op.system_prompt is not None:
            ctx.system_prompt = op.system_prompt
        if op.model_parameters is not None:
            state.model_parameters = op.model_parameters
        if op.metadata is not None:
            state.metadata = dict(op.metadata)
        if op.user is not None:
            state.user = op.user
        if "system_prompt" in op.clear:
            ctx.system_prompt = None
        if "user" in op.clear:
            state.user = None
    else:  # DeleteOp
        del sessions[sid]
        return "applied"
    state.last_lsn = record.lsn
    state.updated_at = max(state.updated_at, record.ts)
    return "applied"


# -- migrations -----------------------------------------------------------------------------

DataKind = Literal["session", "record"]
Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[tuple[str, int], Migration] = {}


def migration(kind: DataKind, from_version: int) -> Callable[[Migration], Migration]:
    """Register a function that turns ``kind`` data of ``from_version`` into the next version."""

    def register(fn: Migration) -> Migration:
        MIGRATIONS[(kind, from_version)] = fn
        return fn

    return register


def upgrade(kind: DataKind, data: dict[str, Any], version: int) -> dict[str, Any]:
    """``data`` of ``version`` brought to ``STATE_SCHEMA_VERSION`` through ``MIGRATIONS``."""
    if version > STATE_SCHEMA_VERSION:
        raise CheckpointError(
            f"{kind} data has schema_version={version}, newer than this M-AI understands "
            f"({STATE_SCHEMA_VERSION}); upgrade M-AI before loading it"
        )
    while version < STATE_SCHEMA_VERSION:
        step = MIGRATIONS.get((kind, version))
        if step is None:
            raise CheckpointError(
                f"no migration of {kind} data from schema_version={version}; register one with "
                f"@migration({kind!r}, {version}) in cluster/state.py"
            )
        data = step(dict(data))
        version += 1
    return data


def load_state(
    data: str | bytes | dict[str, Any], version: int = STATE_SCHEMA_VERSION
) -> ModelState:
    """A ``ModelState`` from JSON (or a dict) written at ``version``."""
    if version == STATE_SCHEMA_VERSION and not isinstance(data, dict):
        return ModelState.model_validate_json(data)
    if not isinstance(data, dict):
        data = json.loads(data)
    return ModelState.model_validate(upgrade("session", data, version))


def load_record(payload: bytes, version: int = STATE_SCHEMA_VERSION) -> LogRecord:
    """A ``LogRecord`` from the JSON payload of a log frame written at ``version``."""
    if version == STATE_SCHEMA_VERSION:
        return LogRecord.model_validate_json(payload)
    return LogRecord.model_validate(upgrade("record", json.loads(payload), version))


# Version 1 (M-AI 0.0.x): flat sessions ("system", "params", "messages" with "text"/"ts"/"turn",
# token usage as prompt/completion tokens) and records with an untyped ("op", "data") pair.


def _message_v1(m: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
    return {
        "role": m["role"],
        "content": m["text"],
        "token_count": 0,
        "timestamp": m["ts"],
        "turn_id": m.get("turn", turn),
    }


def _usage_v1(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    return {"tokens_in": u.get("prompt_tokens", 0), "tokens_out": u.get("completion_tokens", 0)}


@migration("session", 1)
def _session_v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    messages = [_message_v1(m) for m in d.get("messages", [])]
    return {
        "schema_version": 2,
        "session_id": d["session_id"],
        "tenant": d["tenant"],
        "user": d.get("user"),
        "conversation_context": {"system_prompt": d.get("system"), "messages": messages},
        "model_parameters": d.get("params") or {},
        "resource_usage": _usage_v1(d.get("usage")),
        "metadata": d.get("metadata", {}),
        "turn_count": d.get("turns", messages[-1]["turn_id"] + 1 if messages else 0),
        "last_lsn": d.get("lsn", 0),
        "created_at": d["created"],
        "updated_at": d["updated"],
    }


@migration("record", 1)
def _record_v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    kind, data = d["op"], d.get("data") or {}
    if kind == "create":
        op: dict[str, Any] = {"kind": "create", "state": _session_v1_to_v2(data)}
    elif kind == "append":
        op = {
            "kind": "append",
            "turn_id": data["turn"],
            "messages": [_message_v1(m, data["turn"]) for m in data["messages"]],
            "usage": _usage_v1(data.get("usage")) if data.get("usage") else None,
        }
    elif kind == "update":
        op = {
            "kind": "update",
            "system_prompt": data.get("system"),
            "model_parameters": data.get("params"),
        }
    elif kind == "delete":
        op = {"kind": "delete"}
    else:
        raise CheckpointError(f"log record lsn={d.get('lsn')} has unknown v1 op={kind!r}")
    return {
        "lsn": d["lsn"],
        "ts": d["ts"],
        "session_id": d["session_id"],
        "tenant": d["tenant"],
        "op": op,
    }


__all__ = [
    "STATE_SCHEMA_VERSION",
    "ROLES",
    "SESSION_ID_RE",
    "SessionLimits",
    "Message",
    "ConversationContext",
    "ModelParameters",
    "ResourceUsage",
    "TurnMetrics",
    "ModelState",
    "CreateOp",
    "AppendOp",
    "UpdateOp",
    "DeleteOp",
    "LogRecord",
    "apply_record",
    "MIGRATIONS",
    "migration",
    "upgrade",
    "load_state",
    "load_record",
]
