"""The background worker of a memory shard: the queue of absorbed turns still to analyse.

``MemoryShard.absorb_turn`` does the cheap half of a turn at once and hands an ``AbsorbJob``
to ``AbsorbWorker.submit``. The worker runs on the shard's event loop: it embeds the units
still without a vector, hands each job to the ``Absorber`` (facts, dedup, summaries), folds a
user's sessions into the user summary once no more of that user's turns wait, and schedules
the write. The queue is bounded (``memory.absorb_queue``): when full, the oldest turn is
summarized without fact extraction. A job whose session is forgotten while it runs leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from actors.memory.embedding import ShardEmbeddings
from actors.memory.episodic import summarize_user
from actors.memory.forget import SessionForgetting
from actors.memory.learning.absorb import Absorber, AbsorbJob, UserMemory
from actors.memory.unit_memory import UnitMemory
from actors.memory.users import MemoryUsers
from cluster.config.memory import MemoryConfig
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.absorb_worker")


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
                    await self._run_job(self.jobs.popleft())
            await self.housekeeping()
            if self.jobs:
                continue
            self._idle.set()
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _run_job(self, job: AbsorbJob) -> None:
        try:
            memory = await self.users.get(job.tenant, job.user)
            decisions = await self.absorber.run(memory, job, self.clock())
            if self.forgetting.is_forgotten(job.tenant, job.session_id):  # deleted while this turn ran
                await self.forgetting.purge_session(job.tenant, job.session_id)
                decisions = []
            if memory.episodes.user_summary_dirty and not any(
                j.tenant == job.tenant and j.user == job.user for j in self.jobs
            ):
                await summarize_user(memory.episodes, self.absorber.summarizer, self.embeddings.embed_cached,
                                     self.config.episodic)
            self.users.schedule_flush()
            if job.done is not None and not job.done.done():
                job.done.set_result(decisions)
        except Exception as exc:
            log.exception("absorbing a turn failed", extra={"tenant": job.tenant, "session": job.session_id})
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
