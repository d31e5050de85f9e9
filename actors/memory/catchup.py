"""Memory catches up with a session from the session store's log.

A finished turn reaches memory in the background (``absorb_turn``, after the session store
has made it durable). While a memory shard is down, or when it restarts before its last
turns were written, those calls are lost, but the turns are not: the session store holds
every message. Each session request hands memory the session's messages
(``recall(..., history=...)``); ``missed_turns`` finds the exchanges among them that are newer
than the newest turn memory knows of the session, and the shard absorbs them then, in order.
Turn ids are the session's message count after each exchange, as the ingress numbers them,
and ``SessionEpisodes.knows`` refuses a turn id it has, so each turn is absorbed once.

A session memory knows nothing of is not caught up: either it never fed memory, or its user's
memory was deleted (``DELETE /v1/memories``), and what a user asked to forget must not come
back from the session's log.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.memory.api import history_turns
from actors.memory.episodic import SessionEpisodes


def newest_known(session: SessionEpisodes) -> int:
    """The newest turn id memory knows of a session (-1: none)."""
    turns = [t.turn_id for t in (*session.pending, *session.window)]
    return max([session.summarized_through, *turns])


def missed_turns(session: SessionEpisodes | None, history: Sequence[dict[str, str]] | None) -> list[tuple[int, list[dict[str, str]]]]:
    """(turn id, messages) of the exchanges in ``history`` (the session store's messages,
    oldest first) that memory has not absorbed, oldest first; none when memory does not
    know the session."""
    if session is None or not history:
        return []
    newest = newest_known(session)
    if newest < 0:
        return []
    missed, count = [], 0
    for turn in history_turns(history):
        count += len(turn)
        if count > newest and turn[-1]["role"] == "assistant":  # a finished exchange
            missed.append((count, turn))
    return missed


__all__ = ["missed_turns", "newest_known"]
