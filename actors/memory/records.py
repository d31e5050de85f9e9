"""The data of the conversation memory: long-term records, turns, summaries, decisions.

Plain dataclasses shared by the memory modules (docs/memory.md). Everything that crosses the
actor boundary (``MemoryRecall``, ``Decision``, ``public()`` views) is made of plain Python
values, so Ray pickles it cheaply and the HTTP layer can turn it into JSON.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.memory.learning.summarizer import SummarySentence

Action = Literal["add", "update", "supersede", "none"]
Status = Literal["active", "superseded"]


def new_memory_id() -> str:
    return f"mem-{secrets.token_hex(8)}"


@dataclass
class MemoryRecord:
    """One long-term fact of one user. Superseded records are history: kept, never retrieved."""

    id: str
    tenant: str
    user: str
    text: str
    kind: str
    importance: float
    created_at: float
    updated_at: float
    last_accessed_at: float
    slot: str | None = None
    value: str = ""
    access_count: int = 0
    confirmations: int = 0
    source_turns: list[str] = field(default_factory=list)  # "session_id#turn_id"
    origin: str = "extracted"  # extracted | api
    status: Status = "active"
    superseded_by: str | None = None
    superseded_at: float | None = None
    supersedes: list[str] = field(default_factory=list)
    key: int = 0  # the vector index key (per user)

    @property
    def active(self) -> bool:
        return self.status == "active"

    def nbytes(self) -> int:
        """Bytes of the record's own data (text, fields), not counting its embedding."""
        text = len(self.text.encode("utf-8")) + len(self.value.encode("utf-8"))
        sources = sum(len(s) for s in self.source_turns) + 8 * len(self.supersedes)
        return 160 + text + sources + len(self.slot or "")

    def public(self) -> dict[str, Any]:
        """The API view (HTTP and handle): no index key, no embedding."""
        return {
            "id": self.id,
            "object": "memory",
            "text": self.text,
            "kind": self.kind,
            "slot": self.slot,
            "value": self.value,
            "importance": round(self.importance, 4),
            "access_count": self.access_count,
            "confirmations": self.confirmations,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_accessed_at": self.last_accessed_at,
            "source_turns": list(self.source_turns),
            "origin": self.origin,
            "status": self.status,
            "superseded_by": self.superseded_by,
            "superseded_at": self.superseded_at,
            "supersedes": list(self.supersedes),
        }


@dataclass(frozen=True)
class Decision:
    """What deduplication did with one candidate fact (mem0's add/update/delete/none;
    ``supersede`` is mem0's delete that keeps the old fact as history)."""

    action: Action
    text: str
    memory_id: str | None  # the record added or updated (None for ``none``)
    targets: tuple[str, ...] = ()  # records updated or superseded
    similarity: float = 0.0
    reason: str = ""
    source: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "text": self.text,
            "memory_id": self.memory_id,
            "targets": list(self.targets),
            "similarity": round(self.similarity, 4),
            "reason": self.reason,
            "source": self.source,
        }


@dataclass
class TurnRecord:
    """One absorbed turn: its messages, tokens, and the facts found in each sentence."""

    turn_id: int
    messages: list[dict[str, str]]
    tokens: int
    created_at: float
    # "message_index:sentence_index" -> ids of the memory records that sentence stated
    sentence_facts: dict[str, list[str]] = field(default_factory=dict)
    analysed: bool = False  # its facts were extracted: it may be summarized now

    def to_json(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id,
            "messages": self.messages,
            "tokens": self.tokens,
            "created_at": self.created_at,
            "sentence_facts": self.sentence_facts,
            "analysed": self.analysed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TurnRecord:
        return cls(
            int(data["turn_id"]),
            list(data["messages"]),
            int(data["tokens"]),
            float(data["created_at"]),
            {k: list(v) for k, v in dict(data.get("sentence_facts") or {}).items()},
            bool(data.get("analysed", True)),
        )


@dataclass
class SummaryNode:
    """A summary of turns ``first_turn..last_turn``; level 1 summarizes turns, level n+1
    summarizes ``fanout`` summaries of level n."""

    level: int
    first_turn: int
    last_turn: int
    sentences: list[SummarySentence]
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "first_turn": self.first_turn,
            "last_turn": self.last_turn,
            "created_at": self.created_at,
            "sentences": [[s.text, s.turn_id, list(s.fact_ids)] for s in self.sentences],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SummaryNode:
        return cls(
            int(data["level"]),
            int(data["first_turn"]),
            int(data["last_turn"]),
            [SummarySentence(t, int(turn), tuple(ids)) for t, turn, ids in data["sentences"]],
            float(data["created_at"]),
        )


@dataclass(frozen=True)
class RecalledFact:
    id: str
    text: str
    kind: str
    similarity: float
    score: float
    sources: tuple[str, ...] = ()  # "session#turn" it was stated in


@dataclass
class MemoryRecall:
    """What the memory offers one request; ``actors.memory.recall.context.assemble_context`` fits it
    into the prompt with the model's tokenizer."""

    facts: list[RecalledFact] = field(default_factory=list)  # best first
    session_summary: list[str] = field(default_factory=list)  # chronological sentences
    user_summary: list[str] = field(default_factory=list)
    turns: list[list[dict[str, str]]] = field(default_factory=list)  # verbatim, oldest first
    summarized_through: int = -1  # last turn id that the session summary covers
    query_ms: float = 0.0  # time spent embedding the query and searching
    units: list[Any] = field(default_factory=list)  # RecalledUnit of earlier messages, best first


__all__ = [
    "MemoryRecord",
    "Decision",
    "TurnRecord",
    "SummaryNode",
    "RecalledFact",
    "MemoryRecall",
    "new_memory_id",
]
