"""Working and episodic memory of one user: recent turns, and summaries of what fell out.

Per session, ``SessionEpisodes`` keeps the *window* (the newest turns whose tokens fit
``episodic.window_tokens``, counted with the model's tokenizer), the *pending* turns (fallen
out of the window, not yet summarized: still offered verbatim, so nothing is ever missing
from the context), and the summary hierarchy: every ``episode_turns`` pending turns become a
level-1 summary; ``fanout`` summaries of one level are merged into one of the next level. A
session of n turns thus holds at most ``(fanout - 1)`` summaries per level and
``log_fanout(n / episode_turns)`` levels.

Per user, ``UserEpisodes`` holds the sessions and a user summary: a summary of the sessions'
summaries (and of sessions that expired), offered to every session of that user.

The fast part of absorbing a turn (``add_turn``) is synchronous and cheap; summarizing runs
later in the shard's background worker through ``summarize_due`` (embedding off the loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.memory.learning.extraction import split_sentences
from actors.memory.learning.summarizer import SummarySentence
from actors.memory.records import SummaryNode, TurnRecord
from cluster.config.memory import EpisodicConfig

EmbedAsync = Callable[[list[str]], Awaitable[np.ndarray]]
ROLE_LABEL = {"user": "User", "assistant": "Assistant", "system": "System"}
RECENT_SESSIONS_IN_USER_SUMMARY = 64


def turn_sentences(turns: Iterable[TurnRecord]) -> list[SummarySentence]:
    """The sentences of ``turns`` as summary candidates, labelled by role, with their facts."""
    out = []
    for turn in turns:
        for m_index, message in enumerate(turn.messages):
            label = ROLE_LABEL.get(message.get("role", ""), "User")
            for s_index, sentence in enumerate(split_sentences(message.get("content", ""))):
                facts = tuple(turn.sentence_facts.get(f"{m_index}:{s_index}", ()))
                out.append(SummarySentence(f"{label}: {sentence}", turn.turn_id, facts))
    return out


def visible(sentences: Iterable[SummarySentence], superseded: set[str]) -> list[str]:
    """Sentence texts, without those that stated a fact superseded since."""
    return [s.text for s in sentences if not superseded.intersection(s.fact_ids)]


@dataclass
class SessionEpisodes:
    session_id: str
    last_active: float = 0.0
    window: list[TurnRecord] = field(default_factory=list)
    pending: list[TurnRecord] = field(default_factory=list)
    summaries: list[SummaryNode] = field(default_factory=list)
    summarized_through: int = -1

    def knows(self, turn_id: int) -> bool:
        return turn_id <= self.summarized_through or any(
            t.turn_id == turn_id for t in (*self.pending, *self.window)
        )

    def add_turn(self, turn: TurnRecord, window_tokens: int) -> bool:
        """Append a turn (False when it was absorbed already); move what no longer fits the
        window to pending (the newest turn always stays)."""
        if self.knows(turn.turn_id):
            return False
        self.window.append(turn)
        self.window.sort(key=lambda t: t.turn_id)
        self.last_active = max(self.last_active, turn.created_at)
        while len(self.window) > 1 and sum(t.tokens for t in self.window) > window_tokens:
            self.pending.append(self.window.pop(0))
        return True

    def find_turn(self, turn_id: int) -> TurnRecord | None:
        return next((t for t in (*self.window, *self.pending) if t.turn_id == turn_id), None)

    def recent_turns(self) -> list[list[dict[str, str]]]:
        """Pending then window turns, oldest first (verbatim candidates for the prompt)."""
        return [list(t.messages) for t in (*self.pending, *self.window)]

    def due_episode(self, episode_turns: int) -> list[TurnRecord]:
        """The oldest ``episode_turns`` pending turns, once all of them are analysed (a turn's
        facts must be known before it is summarized, see ``visible``)."""
        ready = 0
        for turn in self.pending:
            if not turn.analysed:
                break
            ready += 1
        return list(self.pending[:episode_turns]) if ready >= episode_turns else []

    def unanalysed(self) -> list[TurnRecord]:
        return [t for t in (*self.pending, *self.window) if not t.analysed]

    def add_summary(self, node: SummaryNode, covered: Sequence[TurnRecord]) -> None:
        ids = {t.turn_id for t in covered}
        self.pending = [t for t in self.pending if t.turn_id not in ids]
        self.summaries.append(node)
        self.summaries.sort(key=lambda n: n.first_turn)
        self.summarized_through = max(self.summarized_through, node.last_turn)

    def merge_due(self, fanout: int) -> list[SummaryNode]:
        """The oldest ``fanout`` summaries of the lowest level that has that many."""
        levels = sorted({n.level for n in self.summaries})
        for level in levels:
            nodes = [n for n in self.summaries if n.level == level]
            if len(nodes) >= fanout:
                return nodes[:fanout]
        return []

    def replace(self, nodes: Sequence[SummaryNode], merged: SummaryNode) -> None:
        ids = {id(n) for n in nodes}
        self.summaries = [n for n in self.summaries if id(n) not in ids] + [merged]
        self.summaries.sort(key=lambda n: n.first_turn)

    def summary_sentences(self) -> list[SummarySentence]:
        return [s for node in self.summaries for s in node.sentences]

    def nbytes(self) -> int:
        text = sum(len(m.get("content", "")) for t in (*self.window, *self.pending) for m in t.messages)
        text += sum(len(s.text) for s in self.summary_sentences())
        return 64 + text

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "last_active": self.last_active,
            "summarized_through": self.summarized_through,
            "window": [t.to_json() for t in self.window],
            "pending": [t.to_json() for t in self.pending],
            "summaries": [n.to_json() for n in self.summaries],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionEpisodes:
        return cls(
            session_id=data["session_id"],
            last_active=float(data["last_active"]),
            window=[TurnRecord.from_json(t) for t in data["window"]],
            pending=[TurnRecord.from_json(t) for t in data["pending"]],
            summaries=[SummaryNode.from_json(n) for n in data["summaries"]],
            summarized_through=int(data["summarized_through"]),
        )


@dataclass
class UserEpisodes:
    sessions: dict[str, SessionEpisodes] = field(default_factory=dict)
    user_summary: list[SummarySentence] = field(default_factory=list)
    archived: list[SummarySentence] = field(default_factory=list)  # from expired sessions
    user_summary_dirty: bool = False

    def session(self, session_id: str) -> SessionEpisodes:
        found = self.sessions.get(session_id)
        if found is None:
            found = self.sessions[session_id] = SessionEpisodes(session_id)
        return found

    def user_summary_inputs(self) -> list[SummarySentence]:
        recent = sorted(self.sessions.values(), key=lambda s: s.last_active)[-RECENT_SESSIONS_IN_USER_SUMMARY:]
        return [*self.archived, *(s for session in recent for s in session.summary_sentences())]

    def nbytes(self) -> int:
        own = sum(len(s.text) for s in (*self.user_summary, *self.archived))
        return own + sum(s.nbytes() for s in self.sessions.values())


async def _summarize(summarizer: Any, sentences: list[SummarySentence], max_tokens: int,
                     vectors: np.ndarray | None) -> list[SummarySentence]:
    result = summarizer.summarize(sentences, max_tokens, vectors)
    if inspect.isawaitable(result):
        result = await result
    return list(result)


async def summarize_due(
    session: SessionEpisodes,
    summarizer: Any,
    embed: EmbedAsync,
    config: EpisodicConfig,
    now: float,
) -> int:
    """Summarize every due episode and merge full levels; returns summaries written."""
    written = 0
    while episode := session.due_episode(config.episode_turns):
        sentences = turn_sentences(episode)
        vectors = await embed([s.text for s in sentences]) if sentences else None
        chosen = await _summarize(summarizer, sentences, config.summary_tokens, vectors)
        node = SummaryNode(1, episode[0].turn_id, episode[-1].turn_id, chosen, now)
        session.add_summary(node, episode)
        written += 1
    while group := session.merge_due(config.fanout):
        sentences = [s for node in group for s in node.sentences]
        vectors = await embed([s.text for s in sentences]) if sentences else None
        chosen = await _summarize(summarizer, sentences, config.summary_tokens, vectors)
        merged = SummaryNode(group[0].level + 1, group[0].first_turn, group[-1].last_turn, chosen, now)
        session.replace(group, merged)
        written += 1
    return written


async def summarize_user(
    user: UserEpisodes, summarizer: Any, embed: EmbedAsync, config: EpisodicConfig
) -> None:
    """Rebuild the user summary from the sessions' summaries (and expired sessions')."""
    sentences = user.user_summary_inputs()
    vectors = await embed([s.text for s in sentences]) if sentences else None
    user.user_summary = (
        await _summarize(summarizer, sentences, config.user_summary_tokens, vectors) if sentences else []
    )
    user.user_summary_dirty = False


async def expire_sessions(
    user: UserEpisodes, summarizer: Any, embed: EmbedAsync, config: EpisodicConfig,
    cutoff: float,
) -> list[str]:
    """Fold sessions idle since before ``cutoff`` into the archive, then drop them."""
    expired = [s for s in user.sessions.values() if s.last_active < cutoff]
    if not expired:
        return []
    sentences = [*user.archived]
    for session in expired:
        sentences += session.summary_sentences() + turn_sentences((*session.pending, *session.window))
        del user.sessions[session.session_id]
    vectors = await embed([s.text for s in sentences]) if sentences else None
    user.archived = await _summarize(summarizer, sentences, config.user_summary_tokens, vectors)
    user.user_summary_dirty = True
    return [s.session_id for s in expired]


__all__ = [
    "SessionEpisodes",
    "UserEpisodes",
    "turn_sentences",
    "visible",
    "summarize_due",
    "summarize_user",
    "expire_sessions",
]
