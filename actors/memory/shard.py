"""``MemoryShard``: the hierarchical memory of the users that hash to one shard.

A plain asyncio class; Ray makes it an actor where the application is built
(``ray.remote(MemoryShard)``, one per shard, picked by ``shard_for(tenant, user, shards)``).
All state is touched on the event loop thread only; embedding, file I/O and summaries run in
worker threads, so a request's context assembly is never queued behind absorbing a turn:

- ``absorb_turn`` appends the turn to the session window at once (the next request sees it)
  and queues the rest (facts, dedup, summaries) for the background worker;
- ``recall`` / ``assemble`` embed the query, search the user's facts and hand back what fits
  the prompt (``actors.memory.recall.context``);
- list / search / add / delete serve the memory API; ``usage`` and ``report`` the operators.

Memory is scoped by tenant and user: a call names both and sees nothing else. With
``memory.storage_uri`` every changed user is written (Parquet through ``pyarrow.fs``) shortly
after the change and on ``flush()``/``close()``, and loaded again on first use after a
restart (docs/memory.md).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from actors.memory.api import MemoryApi, history_turns
from actors.memory.catchup import missed_turns
from actors.memory.embedding import ShardEmbeddings
from actors.memory.episodic import expire_sessions, summarize_user
from actors.memory.forget import SessionForgetting, session_user
from actors.memory.learning.absorb import Absorber, AbsorbJob, UserMemory
from actors.memory.learning.absorb_worker import AbsorbWorker
from actors.memory.learning.extraction import ModelFactExtractor, RuleFactExtractor, as_memory_query
from actors.memory.learning.summarizer import ExtractiveSummarizer, ModelSummarizer
from actors.memory.recall.context import AssembledContext, ContextAssembler
from actors.memory.recall.retrieval import RecalledUnit
from actors.memory.records import Decision, MemoryRecall, RecalledFact, TurnRecord
from actors.memory.report import MemoryMetrics, memory_report, tenant_usage
from actors.memory.unit_memory import UnitMemory
from actors.memory.users import MemoryUsers
from cluster.config.memory import MemoryConfig
from cluster.errors import ConfigError
from cluster.logging_setup import get_logger
from cluster.plugins import PluginRegistry
from engine.embedding.embedders import Embedder

log = get_logger("actors.memory.shard")

CLEANUP_EVERY_S = 60.0
METRICS_EVERY_S = 10.0


def shard_for(tenant: str, user: str, shards: int) -> int:
    """The memory shard of (tenant, user): stable across processes and restarts."""
    return zlib.crc32(f"{tenant}\x00{user}".encode()) % shards


def approximate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 bytes per token), used only without a tokenizer."""
    return max(1, len(text.encode("utf-8")) // 4) if text else 0


class MemoryShard:
    """The memory of one shard (see the module docstring). Its parts, each with what it needs:
    ``users`` (load, write, journal), ``embeddings``, ``units``, ``absorber`` and ``worker``
    (the background half of a turn), ``forgetting``, ``api`` (the memory API, delegated)."""

    def __init__(
        self,
        config: MemoryConfig | dict[str, Any] | None = None,
        *,
        shard: int = 0,
        tokenizer: Any = None,
        embedder: Embedder | None = None,
        generate: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,  # operators' tools: read a live root, never write it
        registry: PluginRegistry | None = None,
    ) -> None:
        self.config = config if isinstance(config, MemoryConfig) else MemoryConfig.model_validate(config or {})
        self.shard = shard
        if isinstance(tokenizer, str):
            from engine.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.count_tokens: Callable[[str], int] = (
            tokenizer.count_tokens if tokenizer is not None else approximate_tokens
        )
        self.generate = generate
        self.clock = clock
        self.embeddings = ShardEmbeddings(self.config, embedder, registry)
        self.users = MemoryUsers(self.config, lambda: self.embeddings.embedder, clock, read_only=read_only,
                                 registry=registry)
        self.assembler = ContextAssembler(tokenizer, self.config.context) if tokenizer is not None else None
        self.metrics = MemoryMetrics(shard)
        self._last_cleanup = self._last_metrics = clock()
        self.absorber = Absorber(
            self.config, self._extractor(), self._summarizer(), self.embeddings.embed, self._tenant_full,
            self.embeddings.embed_cached,
        )
        self.units = UnitMemory(self.config, self.users, self.embeddings, self.count_tokens)
        self.forgetting = SessionForgetting(self.users, self.absorber.summarizer, self.embeddings.embed_cached,
                                            self.config.episodic)
        self.worker = AbsorbWorker(self.config, self.users, self.absorber, self.units, self.forgetting,
                                   self.embeddings, clock, self._housekeeping)
        self.users.on_loaded = self.worker.requeue_unanalysed
        self.api = MemoryApi(self.config, self.users, self.embeddings, clock, self._tenant_full)

    # -- components -------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        return self.embeddings.embedder

    def _extractor(self) -> Any:
        if self.config.extractor == "rules":
            return RuleFactExtractor()
        if self.generate is None:
            raise ConfigError(
                "memory.extractor='model' needs the served model's handle (generate=...); "
                "use extractor='rules' where no model can extract facts",
                param="memory.extractor",
            )
        return ModelFactExtractor(self.generate)

    def _summarizer(self) -> Any:
        if self.config.summarizer == "model":
            if self.generate is None:
                raise ConfigError(
                    "memory.summarizer='model' needs the served model's handle (generate=...); "
                    "use summarizer='extractive' where no model can summarize",
                    param="memory.summarizer",
                )
            return ModelSummarizer(self.generate, self.count_tokens)
        return _LazyExtractive(self.embeddings, self.count_tokens)

    def _tenant_full(self, tenant: str) -> bool:
        limit = self.config.capacity.tenant_max_bytes
        if limit is None:
            return False
        used = sum(u.longterm.nbytes() + u.episodes.nbytes() for u in self.users.loaded() if u.tenant == tenant)
        return used >= limit

    # -- users ------------------------------------------------------------------------------

    async def flush(self, include_touched: bool = True) -> dict[str, Any]:
        """Write every changed user now; returns users and bytes written."""
        return await self.users.flush(include_touched)

    async def load_all(self) -> int:
        """Load every stored user (reports over the whole root); returns how many."""
        return await self.users.load_all()

    def loaded_users(self) -> list[UserMemory]:
        return self.users.loaded()

    # -- the memory API (actors/memory/api.py) ----------------------------------------------

    async def list_memories(
        self, tenant: str, user: str, *, include_history: bool = False, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        return await self.api.list_memories(tenant, user, include_history=include_history, limit=limit,
                                            offset=offset)

    async def search_memories(self, tenant: str, user: str, query: str, *, limit: int = 10) -> dict[str, Any]:
        return await self.api.search_memories(tenant, user, query, limit=limit)

    async def add_memory(
        self, tenant: str, user: str, text: str, *, kind: str = "attribute", importance: float | None = None,
        slot: str | None = None, value: str = "",
    ) -> dict[str, Any]:
        return await self.api.add_memory(tenant, user, text, kind=kind, importance=importance, slot=slot,
                                         value=value)

    async def import_memories(self, tenant: str, user: str, items: Sequence[dict[str, Any]],
                              vectors: Any = None) -> dict[str, Any]:
        return await self.api.import_memories(tenant, user, items, vectors)

    async def get_memory(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self.api.get_memory(tenant, user, memory_id)

    async def delete_memory(self, tenant: str, user: str, memory_id: str) -> dict[str, Any]:
        return await self.api.delete_memory(tenant, user, memory_id)

    async def delete_user_memories(self, tenant: str, user: str) -> dict[str, Any]:
        return await self.api.delete_user_memories(tenant, user)

    async def search_units(
        self, tenant: str, user: str, query: str, *, mode: str | None = None, limit: int = 256,
        session_id: str | None = None,
    ) -> list[RecalledUnit]:
        return await self.units.search(tenant, user, query, mode=mode, limit=limit, session_id=session_id)

    # -- forgetting a session (actors/memory/forget.py) -------------------------------------

    def is_forgotten(self, tenant: str, session_id: str) -> bool:
        return self.forgetting.is_forgotten(tenant, session_id)

    async def forget_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Forget what this shard holds of a session (actors/memory/forget.py): turns of it
        are refused from now on, its queued turns dropped, its windows and units removed."""
        self.forgetting.remember(tenant, session_id)
        dropped = self.worker.drop_session(tenant, session_id)
        result = await self.forgetting.purge_session(tenant, session_id)
        if result["windows_removed"] or result["units_removed"]:
            self.users.schedule_flush()
        return result | {"turns_dropped": dropped}

    # -- absorbing turns --------------------------------------------------------------------

    async def absorb_turn(
        self,
        tenant: str,
        user: str,
        session_id: str,
        turn_id: int,
        messages: Sequence[dict[str, str]],
        *,
        wait: bool = False,
        at: float | None = None,
    ) -> dict[str, Any]:
        """Add a finished turn: it joins the session window and its messages become memory
        units now (a message's ``name`` is its speaker); facts, summaries and the units'
        embeddings follow in the background (``wait=True`` returns once they are done, with
        the decisions). ``at``: when the turn was said (epoch seconds; default now), the
        date that units carry and relative dates resolve against."""
        if self.forgetting.is_forgotten(tenant, session_id):
            return {"queued": False, "reason": f"session {session_id} was deleted"}
        memory = await self.users.get(tenant, user)
        now = self.clock()
        self.units.absorb(memory, session_id, int(turn_id), messages, now if at is None else float(at))
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        tokens = sum(self.count_tokens(m["content"]) for m in messages)
        turn = TurnRecord(int(turn_id), messages, tokens, now)
        session = memory.episodes.session(session_id)
        if not session.add_turn(turn, self.config.episodic.window_tokens):
            return {"queued": False, "reason": f"turn {turn_id} of {session_id} was absorbed already"}
        memory.dirty = True
        job = AbsorbJob(tenant, user, session_id, int(turn_id), messages, now,
                        asyncio.get_running_loop().create_future() if wait else None)
        self.worker.submit(job)
        if wait and job.done is not None:
            decisions = await job.done
            return {"queued": True, "decisions": [d.public() for d in decisions]}
        return {"queued": True, "pending": len(self.worker)}

    async def _housekeeping(self) -> None:
        now = self.clock()
        if now - self._last_cleanup >= CLEANUP_EVERY_S:
            await self.cleanup(now)
        if now - self._last_metrics >= METRICS_EVERY_S:
            self._last_metrics = now
            self.metrics.publish(tenant_usage(self.users.loaded(), self.config))

    async def drain(self) -> None:
        """Wait until every queued turn is absorbed (tests, benchmarks, shutdown)."""
        await self.worker.drain()

    # -- context ----------------------------------------------------------------------------

    async def recall(
        self,
        tenant: str,
        user: str,
        session_id: str | None = None,
        query: str | None = None,
        *,
        top_k: int | None = None,
        history: Sequence[dict[str, str]] | None = None,
        touch: bool = True,
    ) -> MemoryRecall:
        """What memory offers a request: ranked facts for ``query``, the session and user
        summaries (without sentences about superseded facts) and the recent turns. Without
        turns of its own for the session, ``history`` (the session store's messages) is used.
        ``touch``: the facts recalled count as used (not for a preview of the prompt)."""
        memory = await self._recalled_user(tenant, user, session_id)
        if session_id and history:  # turns lost while this shard was down (memory_catchup.py)
            missed = missed_turns(memory.episodes.sessions.get(session_id), history)
            for turn_id, turn in missed:
                await self.absorb_turn(tenant, user, session_id, turn_id, turn)
            if missed:
                log.info("memory caught up with a session", extra={"session": session_id, "turns": len(missed)})
        started = time.perf_counter()
        k = self.config.retrieval.top_k if top_k is None else top_k
        facts: list[RecalledFact] = []
        want_facts = bool(query and k > 0 and memory.longterm.active_count)
        want_units = bool(query and memory.units is not None and len(memory.units.dense)
                          and self.config.units.mode != "lexical")
        fact_vector = unit_vector = None
        if query and (want_facts or want_units):
            # facts are stored in the third person, units verbatim: one embedding serves both
            # when the rewrite changes nothing, else both go in one batch
            fact_query = as_memory_query(query)
            texts = [query] if fact_query == query else [query, fact_query]
            vectors = await self.embeddings.embed(texts)
            unit_vector, fact_vector = vectors[0], vectors[-1]
        if want_facts and fact_vector is not None:
            for item in memory.longterm.search(fact_vector, k, self.clock(), touch=touch):
                record = item.record
                facts.append(RecalledFact(record.id, record.text, record.kind, item.similarity, item.score,
                                          tuple(record.source_turns)))
            if facts and touch:
                memory.touched = True  # written with the next flush, or within a minute
                self.users.schedule_flush()
        session = memory.episodes.sessions.get(session_id) if session_id else None
        units = self.units.recall(memory, session, query or "", unit_vector)
        query_ms = (time.perf_counter() - started) * 1000
        recall = self._recall_parts(memory, session_id, facts, history, query_ms)
        recall.units = units
        return recall

    async def _recalled_user(self, tenant: str, user: str, session_id: str | None) -> UserMemory:
        """The user a recall reads. A request that raced its session's delete gets an empty,
        unkept memory for the session's own user: loading it would keep a user that the delete
        removed (one per such request, for the life of the process)."""
        if session_id and user == session_user(session_id) and self.forgetting.is_forgotten(tenant, session_id):
            return self.users.new(tenant, user)
        return await self.users.get(tenant, user)

    async def assemble(
        self,
        tenant: str,
        user: str,
        session_id: str | None,
        messages: Sequence[Any],
        *,
        context_length: int,
        max_tokens: int,
        system_prompt: str | None = None,
        history: Sequence[dict[str, str]] | None = None,
    ) -> AssembledContext:
        """``recall`` then fit it into the prompt with this shard's tokenizer."""
        if self.assembler is None:
            raise ConfigError(
                "MemoryShard.assemble needs the model's tokenizer (tokenizer=...); or call "
                "recall() and actors.memory_context.assemble_context with the model's tokenizer",
                param="tokenizer",
            )
        query = _last_user_text(messages)
        recall = await self.recall(tenant, user, session_id, query, history=history)
        assembled = self.assembler.assemble(
            messages, context_length=context_length, max_tokens=max_tokens, recall=recall,
            system_prompt=system_prompt,
        )
        assembled.query_ms = recall.query_ms
        return assembled

    def _recall_parts(
        self,
        memory: UserMemory,
        session_id: str | None,
        facts: list[RecalledFact],
        history: Sequence[dict[str, str]] | None,
        query_ms: float,
    ) -> MemoryRecall:
        superseded = memory.longterm.superseded
        session = memory.episodes.sessions.get(session_id) if session_id else None
        session_summary, turns, through = [], [], -1
        if session is not None:
            session_summary = [s.text for s in session.summary_sentences()
                               if not superseded.intersection(s.fact_ids)]
            turns, through = session.recent_turns(), session.summarized_through
        if not turns and history:
            turns = history_turns(history)
        seen = set(session_summary)
        user_summary = [s.text for s in memory.episodes.user_summary
                        if s.text not in seen and not superseded.intersection(s.fact_ids)]
        return MemoryRecall(facts, session_summary, user_summary, turns, through, query_ms)

    # -- cleanup and persistence ------------------------------------------------------------

    async def cleanup(self, now: float | None = None) -> dict[str, Any]:
        """TTL and capacity of every loaded user, and idle sessions folded into user summaries."""
        now = self.clock() if now is None else now
        self._last_cleanup = now
        totals = {"expired": 0, "evicted": 0, "history_dropped": 0, "sessions_expired": 0}
        session_ttl = self.config.capacity.session_ttl_s
        for memory in list(self.users.loaded()):
            result = memory.longterm.cleanup(now)
            for key, value in result.items():
                totals[key] += value
            if session_ttl is not None:
                gone = await expire_sessions(memory.episodes, self.absorber.summarizer,
                                             self.embeddings.embed_cached, self.config.episodic, now - session_ttl)
                totals["sessions_expired"] += len(gone)
                if gone:
                    await summarize_user(memory.episodes, self.absorber.summarizer,
                                         self.embeddings.embed_cached, self.config.episodic)
            if any(result.values()) or memory.episodes.user_summary_dirty:
                memory.dirty = True
        self.users.schedule_flush()
        return totals

    async def close(self) -> None:
        """Absorb what is queued, write everything, stop the worker."""
        await self.drain()
        await self.flush()
        self.users.close()
        self.worker.stop()

    # -- operators --------------------------------------------------------------------------

    async def usage(self, tenant: str | None = None) -> dict[str, Any]:
        rows = tenant_usage(self.users.loaded(), self.config)
        return {name: row for name, row in rows.items() if tenant is None or name == tenant}

    async def report(self, tenant: str | None = None, user: str | None = None) -> dict[str, Any]:
        """The ``m-ai memory report`` figures of the loaded users (``load_all`` loads all)."""
        return memory_report(self.users.loaded(), self.config, tenant, user)

    def stats(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "pid": os.getpid(),
            "users": len(self.users.loaded()),
            "queued_turns": len(self.worker),
            "storage": getattr(getattr(self.users.storage, "location", None), "display", None)
            or (type(self.users.storage).__name__ if self.users.storage else None),
        }


class _LazyExtractive:
    """The extractive summarizer, built when first used (the embedder loads lazily)."""

    def __init__(self, embeddings: ShardEmbeddings, count_tokens: Callable[[str], int]) -> None:
        self._embeddings = embeddings
        self._count_tokens = count_tokens
        self._inner: ExtractiveSummarizer | None = None
        self.name = "extractive"

    def summarize(self, sentences: Any, max_tokens: int, embeddings: Any = None) -> Any:
        if self._inner is None:
            self._inner = ExtractiveSummarizer(self._embeddings.embedder, self._count_tokens)
        return self._inner.summarize(sentences, max_tokens, embeddings)


def _last_user_text(messages: Sequence[Any]) -> str | None:
    for message in reversed(list(messages)):
        role = message["role"] if isinstance(message, dict) else getattr(message, "role", None)
        if role == "user":
            return message["content"] if isinstance(message, dict) else message.content
    return None


__all__ = ["MemoryShard", "shard_for", "approximate_tokens", "Decision"]
