"""Forgetting a deleted session: what memory absorbed from it goes with it.

``SessionForgetting`` is held by ``MemoryShard``, with the shard's users, summarizer and
sentence embeddings; the shard's absorb worker drops the session's queued turns.
``DELETE /v1/sessions/{id}`` asks every memory shard to ``forget_session`` before the session
store deletes the session. On each shard:

- the session-scoped user ``session:<id>`` (whose memory a session's requests feed when they
  name no ``user``) is removed whole, in memory and in storage: its facts, window, summaries;
- every loaded user of the tenant loses the session's window, summaries and memory units (the
  session's messages kept for retrieval); the facts a named
  user taught stay, because they belong to the user, not to the conversation (``DELETE
  /v1/memories?user=`` forgets those);
- queued turns of the session are dropped, and the session is remembered as forgotten so that
  a turn finishing after the delete (or the job running right now) cannot bring it back.

The forgotten set is bounded (``FORGOTTEN_KEPT``, oldest out first) and held in memory: a turn
arrives within seconds of its reply, long before the set turns over. A named user that is
not loaded when the session is deleted keeps the session's window in storage until
``memory.episodic.session_ttl_s`` expires it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from actors.memory.episodic import summarize_user
from actors.memory.users import MemoryUsers
from cluster.config.memory import EpisodicConfig

FORGOTTEN_KEPT = 100_000


def session_user(session_id: str) -> str:
    """The memory user of a session whose requests name no user."""
    return f"session:{session_id}"


class SessionForgetting:
    """The forgotten sessions of a shard, and what forgetting one removes."""

    def __init__(
        self,
        users: MemoryUsers,
        summarizer: Any,
        embed_sentences: Callable[[list[str]], Awaitable[np.ndarray]],
        episodic: EpisodicConfig,
        kept: int = FORGOTTEN_KEPT,
    ) -> None:
        self.users = users
        self.summarizer = summarizer
        self.embed_sentences = embed_sentences
        self.episodic = episodic
        self.kept = kept
        self._forgotten: OrderedDict[tuple[str, str], None] = OrderedDict()

    def is_forgotten(self, tenant: str, session_id: str) -> bool:
        return (tenant, session_id) in self._forgotten

    def remember(self, tenant: str, session_id: str) -> None:
        """From now on, turns of the session are refused."""
        self._forgotten[(tenant, session_id)] = None
        self._forgotten.move_to_end((tenant, session_id))
        while len(self._forgotten) > self.kept:
            self._forgotten.popitem(last=False)

    async def purge_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Remove what the loaded users hold of the session (the caller schedules the write
        when ``windows_removed`` or ``units_removed`` is not zero)."""
        removed_user = await self.users.remove(tenant, session_user(session_id))
        windows = units = 0
        for memory in self.users.loaded():
            if memory.tenant == tenant and memory.units is not None:
                removed = memory.units.remove_session(session_id)
                if removed:
                    memory.dirty = True
                    units += removed
            if memory.tenant == tenant and memory.episodes.sessions.pop(session_id, None) is not None:
                # the user summary is rebuilt from the sessions left, so none of this one's
                # sentences survive in it
                await summarize_user(memory.episodes, self.summarizer, self.embed_sentences, self.episodic)
                memory.dirty = True
                windows += 1
        return {"object": "memory.session_forgotten", "session_id": session_id,
                "session_user_removed": removed_user, "windows_removed": windows,
                "units_removed": units}


__all__ = ["FORGOTTEN_KEPT", "SessionForgetting", "session_user"]
