"""The typed configuration of the conversation memory (docs/memory.md).

``MemoryConfig`` is meant to become the ``memory`` section of ``AppConfig``: budgets of each
memory level, retrieval and deduplication thresholds, capacities, TTL, usage limits, the
vector index, persistence, and which embedder, summarizer and fact extractor run. Pure data,
frozen, no engine import. Embedders are plugins (entry point group ``m_ai.embedders``); the
built-ins are ``minilm`` (all-MiniLM-L6-v2, offline) and ``hashing`` (tests).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.config.output import PluginRef

# Weight precisions of the built-in `minilm` embedder (engine/minilm.MiniLMEmbedder):
# auto = fp16 where torch has the fbgemm engine (x86), else fp32.
MINILM_PRECISIONS = ("auto", "fp32", "fp16")
# Precisions of its batches (absorbing): auto = bf16 where the CPU computes bf16 natively
# (oneDNN: AVX512-BF16, AMX) and `precision` is auto, else the same as single texts.
MINILM_BATCH_PRECISIONS = ("auto", "bf16", "same")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class EpisodicConfig(_Frozen):
    """Working window and the summary hierarchy (per session, then per user)."""

    window_tokens: int = Field(
        1024,
        ge=16,
        description="Tokens of recent turns kept verbatim per session (model tokenizer); older "
        "turns fall out of the window and are summarized.",
    )
    episode_turns: int = Field(
        8, ge=1, description="Fallen-out turns summarized together into one level-1 summary."
    )
    fanout: int = Field(
        4, ge=2, description="Summaries of one level merged into one summary of the next level."
    )
    summary_tokens: int = Field(
        96, ge=8, description="Tokens one summary holds at most (any level)."
    )
    user_summary_tokens: int = Field(
        160, ge=8, description="Tokens of the per-user summary (across the user's sessions)."
    )


class RetrievalConfig(_Frozen):
    """How long-term memories are ranked for a request (scores in [0, 1])."""

    top_k: int = Field(8, ge=0, le=256, description="Long-term memories offered per request.")
    candidates: int = Field(
        48, ge=1, description="Nearest neighbours fetched before re-ranking (>= top_k)."
    )
    min_similarity: float = Field(
        0.2, ge=-1.0, le=1.0, description="Cosine similarity below which a memory is not offered."
    )
    weight_similarity: float = Field(0.70, ge=0.0, description="Weight of query similarity.")
    weight_importance: float = Field(0.15, ge=0.0, description="Weight of importance.")
    weight_recency: float = Field(0.10, ge=0.0, description="Weight of recency (half-life decay).")
    weight_access: float = Field(0.05, ge=0.0, description="Weight of past use (log-scaled).")
    recency_half_life_s: float = Field(
        30 * 86_400.0, gt=0, description="Age at which the recency score halves."
    )

    @model_validator(mode="after")
    def _check(self) -> RetrievalConfig:
        if self.candidates < self.top_k:
            raise ValueError(
                f"candidates={self.candidates} is below top_k={self.top_k}; set candidates >= top_k"
            )
        return self


class UnitRetrievalConfig(_Frozen):
    """Hybrid retrieval over every absorbed message (actors/memory/recall/retrieval.py)."""

    mode: Literal["hybrid", "fused", "dense", "lexical"] = Field(
        "hybrid",
        description="hybrid: dense + BM25 fused, with speaker, entity and time signals and "
        "neighbours of hits; fused: dense + BM25 only; dense or lexical: one retriever alone.",
    )
    candidates: int = Field(100, ge=1, le=10_000, description="Units each retriever returns before fusion.")
    rrf_k: float = Field(
        60.0, gt=0.0, description="Reciprocal rank fusion constant (1 / (k + rank)); lower favours the top "
        "ranks. 60 is the usual value (Cormack et al., 2009)."
    )
    speaker_weight: float = Field(
        0.5, ge=0.0, description="Score boost of units said by a person the question names."
    )
    entity_weight: float = Field(
        0.3, ge=0.0, description="Score boost of units naming a capitalised entity of the question."
    )
    time_weight: float = Field(
        0.3, ge=0.0, description="Score boost of dated units for questions about time, and of "
        "units dated within a span the question names."
    )
    neighbours: int = Field(1, ge=0, le=8, description="Units before and after a hit offered with it.")
    neighbour_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="A neighbour's score as a share of its hit's score."
    )
    max_units: int = Field(256, ge=0, le=10_000, description="Units offered per request (best first).")


class DedupConfig(_Frozen):
    """mem0-style decisions for a new fact against the nearest existing ones."""

    update_similarity: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Cosine at or above which a new fact without a slot is a paraphrase of an "
        "existing one (update: merge sources, bump importance).",
    )
    neighbours: int = Field(8, ge=1, description="Existing facts compared with each new one.")
    importance_bump: float = Field(
        0.05, ge=0.0, le=1.0, description="Importance added when a paraphrase confirms a fact."
    )


class CapacityConfig(_Frozen):
    """Cleanup and usage limits."""

    max_memories_per_user: int = Field(
        10_000, ge=1, description="Live long-term memories per user; beyond it the lowest "
        "priority ones are evicted."
    )
    max_history_per_user: int = Field(
        1_000, ge=0, description="Superseded memories kept as history per user (oldest go first)."
    )
    ttl_s: float | None = Field(
        None, gt=0, description="Memories not used or confirmed for this long are removed; None keeps them."
    )
    session_ttl_s: float | None = Field(
        30 * 86_400.0, gt=0, description="Idle sessions' windows and summaries are folded into "
        "the user summary then dropped after this long; None keeps them."
    )
    tenant_max_bytes: int | None = Field(
        None, ge=1, description="Bytes of memory one tenant may hold in one shard; None: no limit."
    )
    warn_fraction: float = Field(
        0.8, gt=0.0, le=1.0, description="Share of a limit at which usage is reported as a warning."
    )


class IndexConfig(_Frozen):
    """The per-user vector index: exact below a threshold, HNSW (usearch) above it."""

    brute_force_below: int = Field(
        4_096, ge=0, description="Memories below which search is an exact matrix product."
    )
    embedding_dtype: Literal["f32", "f16", "i8"] = Field(
        "i8", description="Stored embedding precision (i8: 4x smaller than f32)."
    )
    connectivity: int = Field(16, ge=4, le=128, description="HNSW edges per node (M).")
    expansion_add: int = Field(
        64, ge=8, description="HNSW ef at construction (128 builds ~2.5x slower for little gain here)."
    )
    expansion_search: int = Field(64, ge=8, description="HNSW ef at search.")
    persist_index: bool = Field(
        True, description="Save the HNSW graph with the memories (loading it beats rebuilding)."
    )


class ContextConfig(_Frozen):
    """Shares of the prompt budget and the priority of the parts (docs/memory.md)."""

    long_term_share: float = Field(
        0.25, ge=0.0, le=1.0, description="Budget share long-term memories may take at most."
    )
    episodic_share: float = Field(
        0.20, ge=0.0, le=1.0, description="Budget share episodic summaries may take at most."
    )
    min_recent_turns: int = Field(
        1, ge=0, description="Most recent turns placed before memories and summaries."
    )
    facts_header: str = Field(
        "Facts about the user from earlier conversations:", description="Heading of the memories."
    )
    summary_header: str = Field(
        "Summary of this conversation so far:", description="Heading of the session summary."
    )
    user_summary_header: str = Field(
        "Summary of earlier conversations with this user:", description="Heading of the user summary."
    )
    units_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Budget share the retrieved messages of earlier "
        "conversations may take at most (they get what the session's own turns and summary leave)."
    )
    units_header: str = Field(
        "From earlier conversations (by date):", description="Heading of the retrieved messages."
    )

    @model_validator(mode="after")
    def _check(self) -> ContextConfig:
        if self.long_term_share + self.episodic_share > 1.0:
            raise ValueError(
                f"long_term_share={self.long_term_share} plus episodic_share={self.episodic_share} "
                f"is above 1; lower one of them"
            )
        return self


def _plugin_ref(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class MemoryConfig(_Frozen):
    """The ``memory`` section: the hierarchical conversation memory."""

    enabled: bool = Field(True, description="Assemble context from memory for session requests.")
    shards: int = Field(1, ge=1, le=1024, description="Memory actors (hash of tenant/user).")
    embedder: PluginRef = Field(
        default_factory=lambda: PluginRef(name="minilm"),
        description="Built-in `minilm` or `hashing`, or an `m_ai.embedders` entry point. "
        "`minilm` options: model_path, threads (CPU threads: above 1, each batch of texts is "
        "split over them, each on one torch thread; 2 took LoCoMo absorbing from 127 to 214 "
        "turns/s), batch_size, max_length, trace_single, and "
        "precision (auto | fp32 | fp16: its Linear weights' precision; auto is fp16 where torch "
        "has fbgemm (x86): half the time per query, vectors within cosine 0.99999 of fp32), "
        "batch_precision (auto | bf16 | same: batches of texts, i.e. absorbing; auto is bf16 "
        "where the CPU computes bf16 natively and precision is auto: a third less CPU per text, "
        "cosine 0.9999 to fp32).",
    )
    summarizer: Literal["extractive", "model"] = Field(
        "extractive", description="`model` asks a model through a `generate` callable given to "
        "MemoryShard (library use); an app config refuses it: its memory actors get no model handle."
    )
    extractor: Literal["rules", "model"] = Field(
        "rules", description="`model` asks a model through a `generate` callable given to "
        "MemoryShard (library use); an app config refuses it: its memory actors get no model handle."
    )
    storage_uri: str | None = Field(
        None, description="Directory or s3:// / gs:// URI for Parquet files; None keeps memory in RAM."
    )
    backend: PluginRef | None = Field(
        None,
        description="A storage plugin (entry point group `m_ai.memory_backends`) used instead of the "
        "Parquet files under storage_uri: `users()`, `read(tenant, user)`, `write(tenant, user, facts, "
        "episodes, graph)`, `delete(tenant, user)` (see actors/memory_persistence.MemoryStorage).",
    )
    persist_interval_s: float = Field(
        2.0, ge=0.0, description="Delay after a change before changed users are written (0: at once)."
    )
    absorb_queue: int = Field(
        10_000, ge=1, description="Turns waiting to be absorbed; beyond it the oldest are dropped."
    )
    episodic: EpisodicConfig = Field(default_factory=EpisodicConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    units: UnitRetrievalConfig = Field(default_factory=UnitRetrievalConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    capacity: CapacityConfig = Field(default_factory=CapacityConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)

    @field_validator("embedder", "backend", mode="before")
    @classmethod
    def _embedder_ref(cls, value: Any) -> Any:
        return _plugin_ref(value)

    @field_validator("embedder")
    @classmethod
    def _check_minilm_precision(cls, value: PluginRef) -> PluginRef:
        precision = value.options.get("precision", "auto") if value.name == "minilm" else "auto"
        if precision not in MINILM_PRECISIONS:
            raise ValueError(
                f"embedder.options.precision={precision!r} is not one of "
                f"{', '.join(MINILM_PRECISIONS)}; use auto (fp16 where torch has fbgemm, "
                "x86), fp16 or fp32 (exact)"
            )
        threads = value.options.get("threads") if value.name == "minilm" else None
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(
                f"embedder.options.threads={threads!r} is not a positive whole number; give the "
                "CPU threads the embedder may use (2 splits each batch over two threads), or leave "
                "it out to keep torch's thread count"
            )
        batch = value.options.get("batch_precision", "auto") if value.name == "minilm" else "auto"
        if batch not in MINILM_BATCH_PRECISIONS:
            raise ValueError(
                f"embedder.options.batch_precision={batch!r} is not one of "
                f"{', '.join(MINILM_BATCH_PRECISIONS)}; use auto (bf16 where the CPU has native "
                "bf16), bf16, or same (batches in `precision`)"
            )
        return value

    @field_validator("storage_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError(f"storage_uri={value!r} is empty; give a directory or s3:// / gs:// URI")
        return value.strip() if value else value


__all__ = [
    "MINILM_PRECISIONS",
    "MINILM_BATCH_PRECISIONS",
    "MemoryConfig",
    "EpisodicConfig",
    "RetrievalConfig",
    "UnitRetrievalConfig",
    "DedupConfig",
    "CapacityConfig",
    "IndexConfig",
    "ContextConfig",
]
