"""Checks that turn a caller's session request into a log operation, or refuse it.

Pure functions (no I/O, no shard state): ``SessionShard`` calls them before it reserves
anything, so a refused request changes nothing. Every refusal is an ``InvalidRequestError``
naming the field, the limit or value, and the fix.
"""

from __future__ import annotations

import secrets
import zlib
from typing import Any

from pydantic import ValidationError

from cluster.errors import InvalidRequestError
from cluster.state import (
    SESSION_ID_RE,
    AppendOp,
    ConversationContext,
    Message,
    ModelParameters,
    ModelState,
    ResourceUsage,
    SessionLimits,
    TurnMetrics,
    UpdateOp,
)

CLEARABLE = ("model_parameters", "system_prompt", "user")


def shard_for(session_id: str, shards: int) -> int:
    """The store shard that holds ``session_id`` (stable across processes and restarts)."""
    return zlib.crc32(session_id.encode("utf-8")) % shards


def new_session_id() -> str:
    """An unguessable session id: 192 random bits from ``secrets``."""
    return f"sess-{secrets.token_urlsafe(24)}"


def invalid(exc: ValidationError, what: str) -> InvalidRequestError:
    """The first problem pydantic found, as an ``InvalidRequestError`` naming the field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or what
    return InvalidRequestError(
        f"invalid {what}: {where}: {first['msg'].removeprefix('Value error, ')} "
        f"(got {first.get('input')!r})",
        param=where,
    )


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        raise InvalidRequestError(
            f"session_id={session_id!r} is malformed; omit it to get a new id", param="session_id"
        )
    return session_id


def new_state(
    session_id: str,
    tenant: str,
    *,
    now: float,
    system_prompt: str | None = None,
    metadata: dict[str, str] | None = None,
    user: str | None = None,
    model_parameters: ModelParameters | dict[str, Any] | None = None,
) -> ModelState:
    """The state of a new session."""
    try:
        return ModelState(
            session_id=session_id,
            tenant=tenant,
            user=user,
            conversation_context=ConversationContext(system_prompt=system_prompt),
            model_parameters=ModelParameters.model_validate(model_parameters or {}),
            metadata=dict(metadata or {}),
            created_at=now,
            updated_at=now,
        )
    except ValidationError as exc:
        raise invalid(exc, "session") from None


def new_turn(
    messages: Any,
    *,
    turn_id: int,
    now: float,
    limits: SessionLimits,
    request_id: str | None = None,
    usage: ResourceUsage | dict[str, Any] | None = None,
    metrics: TurnMetrics | dict[str, Any] | None = None,
) -> AppendOp:
    """One turn (messages ``{"role", "content", "token_count"?, "tool_items"?}``) as an append
    operation."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= limits.max_messages_per_turn:
        got = len(messages) if isinstance(messages, list) else type(messages).__name__
        raise InvalidRequestError(
            f"messages must be a list of 1 to max_messages_per_turn="
            f"{limits.max_messages_per_turn} messages, got {got}",
            param="messages",
        )
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError(
            "each message must be an object with role and content", param="messages"
        )
    try:
        turn = [
            Message(
                role=m.get("role"),
                content=m.get("content"),
                token_count=m.get("token_count") or 0,
                timestamp=now,
                turn_id=turn_id,
                tool_items=m.get("tool_items"),
            )
            for m in messages
        ]
        delta = ResourceUsage.model_validate(usage) if usage is not None else None
        timing = None
        if metrics is not None:
            fields = dict(metrics if isinstance(metrics, dict) else metrics.model_dump())
            timing = TurnMetrics.model_validate({**fields, "turn_id": turn_id})
        op = AppendOp(
            turn_id=turn_id, messages=turn, request_id=request_id, usage=delta, metrics=timing
        )
    except ValidationError as exc:
        raise invalid(exc, "turn") from None
    too_long = next((m for m in turn if len(m.content) > limits.max_message_chars), None)
    if too_long is not None:
        raise InvalidRequestError(
            f"a {too_long.role} message has {len(too_long.content)} characters, above "
            f"max_message_chars={limits.max_message_chars}; shorten it",
            param="messages",
        )
    return op


def new_update(
    current: ModelParameters,
    *,
    system_prompt: str | None = None,
    model_parameters: ModelParameters | dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    user: str | None = None,
    clear: list[str] | tuple[str, ...] = (),
) -> tuple[UpdateOp, ModelParameters]:
    """A settings change and the parameters it leaves: ``model_parameters`` merge into
    ``current`` unless ``clear`` names ``model_parameters`` (then they start from defaults)."""
    unknown = sorted(set(clear) - set(CLEARABLE))
    if unknown:
        raise InvalidRequestError(
            f"clear={unknown} names unknown settings; use {', '.join(CLEARABLE)}", param="clear"
        )
    try:
        base = ModelParameters() if "model_parameters" in clear else current
        parameters = base.merged(model_parameters) if model_parameters is not None else base
        op = UpdateOp(
            system_prompt=system_prompt,
            model_parameters=parameters if parameters is not current else None,
            metadata=metadata,
            user=user,
            clear=[c for c in clear if c != "model_parameters"],
        )
    except ValidationError as exc:
        raise invalid(exc, "session settings") from None
    return op, parameters


def merged_parameters(
    parameters: ModelParameters, overrides: ModelParameters | dict[str, Any] | None
) -> dict[str, Any]:
    """``parameters`` with one request's ``overrides`` on top, without the unset ones."""
    try:
        return parameters.merged(overrides).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise invalid(exc, "parameter overrides") from None


__all__ = [
    "new_session_id",
    "shard_for",
    "invalid",
    "check_session_id",
    "new_state",
    "new_turn",
    "new_update",
    "merged_parameters",
    "CLEARABLE",
]
