"""The background half of absorbing a turn: facts, deduplication, summaries.

``MemoryShard.absorb_turn`` does the cheap half at once (the turn joins the session's window,
so the next request sees it) and queues an ``AbsorbJob``. Its worker hands each job to
``Absorber.run``: extract facts from the user's sentences, embed them (off the event loop),
deduplicate them against the user's long-term memory, note which sentence stated which fact
(so that summaries never resurrect a superseded fact), then summarize the turns that fell out
of the window and merge full summary levels.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.memory.episodic import UserEpisodes, summarize_due
from actors.memory.learning.extraction import FactCandidate
from actors.memory.longterm import UserLongTerm
from actors.memory.records import Decision
from actors.memory.units import UserUnits
from cluster.config.memory import MemoryConfig
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.learning.absorb")

EmbedAsync = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass
class UserMemory:
    """Everything the memory holds for one (tenant, user)."""

    tenant: str
    user: str
    longterm: UserLongTerm
    episodes: UserEpisodes
    dirty: bool = False  # content changed since the last write
    touched: bool = False  # only access counts changed since the last write
    last_written: float = 0.0
    graph_digest_written: str | None = None  # keys of the HNSW graph in storage (None: none/unknown)
    units: UserUnits | None = None  # every absorbed message, retrievable (set by MemoryUsers.new)


@dataclass
class AbsorbJob:
    tenant: str
    user: str
    session_id: str
    turn_id: int
    messages: list[dict[str, str]]
    created_at: float
    done: asyncio.Future[list[Decision]] | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        return f"{self.session_id}#{self.turn_id}"


class Absorber:
    """Runs one job against one user's memory (see the module docstring)."""

    def __init__(
        self,
        config: MemoryConfig,
        extractor: Any,
        summarizer: Any,
        embed: EmbedAsync,
        tenant_full: Callable[[str], bool] = lambda tenant: False,
        embed_sentences: EmbedAsync | None = None,
    ) -> None:
        self.config = config
        self.extractor = extractor
        self.summarizer = summarizer
        self.embed = embed
        self.embed_sentences = embed_sentences or embed  # may cache: summaries repeat sentences
        self.tenant_full = tenant_full

    async def extract(self, messages: list[dict[str, str]]) -> list[FactCandidate]:
        found = self.extractor.extract(messages)
        if inspect.isawaitable(found):
            found = await found
        return list(found)

    async def run(self, memory: UserMemory, job: AbsorbJob, now: float) -> list[Decision]:
        """Extract, embed and apply the facts of one job, then its summaries."""
        candidates = await self.facts_of(memory, job)
        vectors = await self.embed([c.text for c in candidates]) if candidates else None
        return await self.apply(memory, job, candidates, vectors, now)

    async def facts_of(self, memory: UserMemory, job: AbsorbJob) -> list[FactCandidate]:
        """The facts a job's messages state (none while the tenant is at its limit)."""
        candidates = await self.extract(job.messages)
        if candidates and self.tenant_full(memory.tenant):
            log.warning(
                "tenant at its memory limit: new facts not stored",
                extra={"tenant": memory.tenant, "facts": len(candidates)},
            )
            return []
        return candidates

    async def apply(
        self,
        memory: UserMemory,
        job: AbsorbJob,
        candidates: list[FactCandidate],
        vectors: np.ndarray | None,
        now: float,
    ) -> list[Decision]:
        """Deduplicate ``candidates`` (with their ``vectors``, embedded by the caller, possibly
        in one batch with other jobs' facts) into the user's memory, then summarize what fell
        out of the session's window."""
        session = memory.episodes.session(job.session_id)
        turn = session.find_turn(job.turn_id)
        decisions: list[Decision] = []
        if candidates and vectors is not None:
            for candidate, vector in zip(candidates, vectors):
                decision = memory.longterm.apply(candidate, vector, job.source, now)
                decisions.append(decision)
                if decision.memory_id is not None and memory.units is not None:
                    memory.units.add_fact(job.session_id, job.turn_id, decision.memory_id, candidate.text)
                if turn is not None and decision.memory_id is not None:
                    where = f"{candidate.message_index}:{candidate.sentence_index}"
                    stated = turn.sentence_facts.setdefault(where, [])
                    if decision.memory_id not in stated:
                        stated.append(decision.memory_id)
            if memory.longterm.active_count > self.config.capacity.max_memories_per_user:
                memory.longterm.cleanup(now)
        if turn is not None:
            turn.analysed = True
        written = await summarize_due(
            session, self.summarizer, self.embed_sentences, self.config.episodic, now
        )
        if written:
            memory.episodes.user_summary_dirty = True
        memory.dirty = True
        return decisions


__all__ = ["Absorber", "AbsorbJob", "UserMemory"]
