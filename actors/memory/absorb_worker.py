"""The background worker of a memory shard: the queue of absorbed turns still to analyse.

``MemoryShard.absorb_turn`` does the cheap half of a turn at once and hands an ``AbsorbJob``
to ``AbsorbWorker.submit``. The worker runs on the shard's event loop and works in batches:
the ingress absorbs turns in the background after each reply, so while one batch is embedded
the next turns queue up, and the worker takes up to ``ABSORB_BATCH`` of them at once:

- the units of every queued turn are embedded together (``UnitMemory.embed_pending``);
- the facts of every job in the batch are extracted, then embedded in one call;
- each job is then applied on its own, in queue order (so a session's turns in turn order):
  dedup against the user's facts, summaries, the user summary once no more of that user's
  turns wait, and the write scheduled. A job that fails (extraction, a user that cannot be
  loaded, ...) fails alone: the others of its batch are applied, and its ``wait=True``
  caller gets the error.

The queue is bounded (``memory.absorb_queue``): when full, the oldest turn is summarized
without fact extraction. A turn whose session is forgotten before or while it is applied
leaves nothing behind. The tenant limit is checked when a batch's facts are extracted, so it
may be passed by at most one batch's facts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from actors.memory.embedding import ShardEmbeddings
from actors.memory.episodic import summarize_user
from actors.memory.forget import SessionForgetting
from actors.memory.learning.absorb import Absorber, AbsorbJob, UserMemory
from actors.memory.learning.extraction import FactCandidate
from actors.memory.unit_memory import UnitMemory
from actors.memory.users import MemoryUsers
from cluster.config.memory import MemoryConfig
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.absorb_worker")

ABSORB_BATCH = 64  # queued turns analysed together (their facts embedded in one call)


class AbsorbWorker:
    """The queue of absorb jobs and the task that works it off (see the module docstring)."""

    def __init__(
        self,
        config: MemoryConfig,
        users: MemoryUsers,
        absorber: Absorber,
        units: UnitMemory,
        forgetting: SessionForgetting,
        embeddings: ShardEmbeddings,
        clock: Callable[[], float],
        housekeeping: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.users = users
        self.absorber = absorber
        self.units = units
        self.forgetting = forgetting
        self.embeddings = embeddings
        self.clock = clock
        self.housekeeping = housekeeping
        self.jobs: deque[AbsorbJob] = deque()
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def submit(self, job: AbsorbJob) -> None:
        if len(self.jobs) >= self.config.absorb_queue:
            self._skip(self.jobs.popleft())
        self.jobs.append(job)
        self.start()

    def requeue_unanalysed(self, memory: UserMemory) -> None:
        """Turns whose analysis was queued when the previous process stopped are queued again."""
        for session in memory.episodes.sessions.values():
            for turn in session.unanalysed():
                self.jobs.append(AbsorbJob(memory.tenant, memory.user, session.session_id,
                                           turn.turn_id, turn.messages, turn.created_at))
        if self.jobs or (memory.units is not None and memory.units.unembedded):
            self.start()

    def drop_session(self, tenant: str, session_id: str) -> int:
        """Drop the queued turns of a session; returns how many."""
        dropped = [j for j in self.jobs if j.tenant == tenant and j.session_id == session_id]
        if dropped:
            kept = [j for j in self.jobs if not (j.tenant == tenant and j.session_id == session_id)]
            self.jobs.clear()
            self.jobs.extend(kept)
        for job in dropped:
            if job.done is not None and not job.done.done():
                job.done.set_result([])
        return len(dropped)

    def _skip(self, job: AbsorbJob) -> None:
        """A job dropped from a full queue: its turn is summarized without fact extraction."""
        log.warning("absorb queue full: oldest turn not analysed",
                    extra={"tenant": job.tenant, "session": job.session_id, "turn": job.turn_id})
        memory = self.users.find((job.tenant, job.user))
        session = memory.episodes.sessions.get(job.session_id) if memory else None
        turn = session.find_turn(job.turn_id) if session else None
        if turn is not None:
            turn.analysed = True
        if job.done is not None and not job.done.done():
            job.done.set_result([])

    def start(self) -> None:
        if self._wakeup is None or self._idle is None:
            self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.clear()
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        assert self._wakeup is not None and self._idle is not None
        while True:
            while self.jobs or self.units.has_unembedded():
                if await self.units.embed_pending():
                    self.users.schedule_flush()
                if self.jobs:
                    batch = [self.jobs.popleft() for _ in range(min(len(self.jobs), ABSORB_BATCH))]
                    await self._run_batch(batch)
            await self.housekeeping()
            if self.jobs:
                continue
            self._idle.set()
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _run_batch(self, batch: list[AbsorbJob]) -> None:
        prepared: list[tuple[AbsorbJob, UserMemory, list[FactCandidate]]] = []
        for job in batch:
            try:
                memory = await self.users.get(job.tenant, job.user)
                prepared.append((job, memory, await self.absorber.facts_of(memory, job)))
            except Exception as exc:
                self._failed(job, exc)
        vectors = await self._embed_facts([c.text for _, _, candidates in prepared for c in candidates])
        start = 0
        for position, (job, memory, candidates) in enumerate(prepared):
            job_vectors = vectors[start : start + len(candidates)] if vectors is not None else None
            start += len(candidates)
            later = [j for j, _, _ in prepared[position + 1 :]]
            await self._apply(job, memory, candidates, job_vectors, later)

    async def _embed_facts(self, texts: list[str]) -> np.ndarray | None:
        """The facts of a batch in one call; None if that fails (each job then embeds its own,
        so a text the embedder refuses fails only its turn)."""
        if not texts:
            return np.zeros((0, self.embeddings.embedder.dimension), dtype=np.float32)
        try:
            return await self.embeddings.embed(texts)
        except Exception:
            log.warning("embedding a batch of facts failed: embedding them turn by turn", exc_info=True)
            return None

    async def _apply(
        self,
        job: AbsorbJob,
        memory: UserMemory,
        candidates: list[FactCandidate],
        vectors: np.ndarray | None,
        later: list[AbsorbJob],
    ) -> None:
        try:
            if self.forgetting.is_forgotten(job.tenant, job.session_id):  # deleted since it was taken
                await self.forgetting.purge_session(job.tenant, job.session_id)
                self._finished(job, [])
                return
            if candidates and vectors is None:
                vectors = await self.embeddings.embed([c.text for c in candidates])
            decisions = await self.absorber.apply(memory, job, candidates, vectors, self.clock())
            if self.forgetting.is_forgotten(job.tenant, job.session_id):  # deleted while this turn ran
                await self.forgetting.purge_session(job.tenant, job.session_id)
                decisions = []
            if memory.episodes.user_summary_dirty and not any(
                j.tenant == job.tenant and j.user == job.user for j in (*later, *self.jobs)
            ):
                await summarize_user(memory.episodes, self.absorber.summarizer, self.embeddings.embed_cached,
                                     self.config.episodic)
            self.users.schedule_flush()
            self._finished(job, decisions)
        except Exception as exc:
            self._failed(job, exc)

    @staticmethod
    def _finished(job: AbsorbJob, decisions: list) -> None:
        if job.done is not None and not job.done.done():
            job.done.set_result(decisions)

    @staticmethod
    def _failed(job: AbsorbJob, exc: Exception) -> None:
        log.error("absorbing a turn failed", exc_info=exc,
                  extra={"tenant": job.tenant, "session": job.session_id, "turn": job.turn_id})
        if job.done is not None and not job.done.done():
            job.done.set_exception(exc)

    async def drain(self) -> None:
        """Wait until every queued turn is absorbed (tests, benchmarks, shutdown)."""
        while self.jobs or self.units.has_unembedded() or (self._idle is not None and not self._idle.is_set()):
            if self._task is None or self._task.done():
                self.start()
            assert self._idle is not None
            await self._idle.wait()

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


__all__ = ["AbsorbWorker"]
