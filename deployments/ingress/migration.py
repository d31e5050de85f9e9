"""Mid-stream migration: a request whose model replica dies goes on on another replica.

The ingress keeps, per choice, the output token ids it has passed downstream
(``DeliveredTokens``). When the replica's stream fails because the replica itself is gone
(its actor died or is unreachable: not a client's cancel, not a 4xx, not an error the engine
raised for this request), and ``serving.migration`` allows it (tries left, not too many tokens
sent), the request is sent again with the resume state (``ModelRequest.resume``): the
LLMServer appends each unfinished choice's tokens to its prompt and the engine continues right
after them (``EngineCore.add_request(resumed=...)``), so the client's stream goes on with no
token missing or repeated; with greedy decoding it is identical to an uninterrupted one.

Serve's router drops a replica whose actor died from its candidates, and the session router
(``deployments.llm_server.routing``) falls back to another replica, so the resumption lands on
a live replica, or on the restarted one. It must send its first new token within
``serving.migration.wait_s``; until then a resumption that fails the same way is tried again
after a short pause. Past the bound, or when migration is not allowed, the stream ends as
before: with the typed 503 of the dead replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from cluster.config.migration import MigrationConfig
from cluster.logging_setup import get_logger
from deployments.messages import ChoiceDelta, ModelRequest

log = get_logger("deployments.ingress.migration")

RETRY_PAUSE_S = 0.2  # between resumptions that found no live replica yet


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` says the model replica itself is gone (its actor died or cannot be
    reached), rather than that it ran and failed this request (a ``RayTaskError``, or one of
    our typed errors)."""
    import ray.exceptions
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (ray.exceptions.RayActorError, ReplicaUnavailableError))


class DeliveredTokens:
    """The output token ids of each choice that have gone downstream, and which choices ended."""

    def __init__(self, n: int) -> None:
        self.ids: dict[int, list[int]] = {i: [] for i in range(n)}
        self.finished: set[int] = set()

    def add(self, delta: ChoiceDelta) -> None:
        self.ids[delta.index].extend(delta.output.token_ids)
        if delta.output.finished:
            self.finished.add(delta.index)

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.ids.values())

    def resume_state(self) -> dict[int, list[int]]:
        """What a resumption continues: every unfinished choice and its tokens so far."""
        return {i: list(ids) for i, ids in self.ids.items() if i not in self.finished}


class StreamMigration:
    """Runs a request's streams, resuming it when its replica dies (module docstring).
    ``record(outcome, model, seconds)``: reports each migration (resumed, or why not)."""

    def __init__(self, config: MigrationConfig, record: Callable[[str, str, float | None], None]) -> None:
        self.config = config
        self.record = record

    def refusal(self, delivered: DeliveredTokens, tries: int) -> str | None:
        """Why a stream whose replica died is not resumed (its outcome label), or None."""
        if not self.config.enabled:
            return "disabled"
        if tries >= self.config.max_tries:
            return "max_tries"
        if delivered.count > self.config.max_tokens:
            return "max_tokens"
        return None

    async def deltas(self, message: ModelRequest, send: Callable[[ModelRequest], Any]) -> AsyncIterator[ChoiceDelta]:
        """The deltas of ``message`` across as many resumptions as the config allows; ``send``
        sends one attempt to a replica (Serve's streaming response). Closing this stream
        before its end cancels the attempt that runs: the one cancellation path, hop by hop
        down to the engine."""
        delivered = DeliveredTokens(message.body.n)
        attempt, tries = message, 0
        died: BaseException | None = None  # the death being migrated away from
        died_at = 0.0
        while True:
            deadline = died_at + self.config.wait_s if died is not None else None
            try:
                async with aclosing(_first_within(_replica_deltas(send(attempt)), deadline)) as stream:
                    async for delta in stream:
                        if died is not None:
                            self._resumed(message, delivered, tries, time.monotonic() - died_at)
                            died = None
                        delivered.add(delta)
                        yield delta
                return
            except Exception as exc:
                if died is None:  # a running stream failed
                    if not replica_died(exc):
                        raise
                    why_not = self.refusal(delivered, tries)
                    if why_not is not None:
                        self._gave_up(why_not, message, delivered, exc)
                        raise
                    died, died_at, tries = exc, time.monotonic(), tries + 1
                else:  # a resumption found no live replica (yet)
                    if not (replica_died(exc) or isinstance(exc, TimeoutError)):
                        raise
                    if time.monotonic() - died_at >= self.config.wait_s:
                        self._gave_up("wait_s", message, delivered, died)
                        raise died from None
                    await asyncio.sleep(RETRY_PAUSE_S)
            resume = delivered.resume_state()
            if not resume:  # every choice had ended: nothing left to generate
                return
            # streamed from the new replica even for a whole answer: wait_s bounds its first token,
            # and a second death finds what it sent
            attempt = dataclasses.replace(message, resume=resume, attempt=tries, stream=True)

    def _resumed(self, message: ModelRequest, delivered: DeliveredTokens, tries: int, took: float) -> None:
        self.record("resumed", message.body.model, took)
        log.info(
            "stream resumed on another replica",
            extra={"request_id": message.request_id, "try": tries, "tokens": delivered.count,
                   "seconds": round(took, 3)},
        )

    def _gave_up(self, why: str, message: ModelRequest, delivered: DeliveredTokens, exc: BaseException) -> None:
        self.record(why, message.body.model, None)
        if why != "disabled":
            log.warning(
                "stream not resumed after its replica died",
                extra={"request_id": message.request_id, "reason": why, "tokens": delivered.count,
                       "error": type(exc).__name__},
            )


async def _replica_deltas(response: Any) -> AsyncIterator[ChoiceDelta]:
    """The deltas of one Serve streaming response; closed before its end, it cancels the call
    (the replica closes its engine streams, which frees their slots)."""
    finished = False
    try:
        async for delta in response:
            yield delta
        finished = True
    except Exception:
        finished = True  # the replica ended it
        raise
    finally:
        if not finished:
            response.cancel()


async def _first_within(stream: AsyncIterator[ChoiceDelta], deadline: float | None) -> AsyncIterator[ChoiceDelta]:
    """``stream``, its first delta within ``deadline`` (monotonic; None: unbounded)."""
    async with aclosing(stream):
        if deadline is not None:
            try:
                first = await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            yield first
        async for delta in stream:
            yield delta


__all__ = ["DeliveredTokens", "StreamMigration", "replica_died"]
