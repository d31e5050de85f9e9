"""Forgetting a deleted session: what memory absorbed from it goes with it.

Mixed into ``MemoryShard`` (which provides ``users``, ``_jobs`` and ``_schedule_flush``).
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

from collections import OrderedDict, deque
from typing import Any

from actors.memory.episodic import summarize_user

FORGOTTEN_KEPT = 100_000


def session_user(session_id: str) -> str:
    """The memory user of a session whose requests name no user."""
    return f"session:{session_id}"


class SessionForgetting:
    """``forget_session`` and the check that keeps a forgotten session forgotten."""

    _forgotten: OrderedDict[tuple[str, str], None]  # set in MemoryShard.__init__

    def is_forgotten(self, tenant: str, session_id: str) -> bool:
        return (tenant, session_id) in self._forgotten

    async def forget_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Forget what this shard holds of a session (see the module docstring)."""
        self._forgotten[(tenant, session_id)] = None
        self._forgotten.move_to_end((tenant, session_id))
        while len(self._forgotten) > FORGOTTEN_KEPT:
            self._forgotten.popitem(last=False)
        jobs: deque = self._jobs  # type: ignore[attr-defined]
        kept = deque(j for j in jobs if not (j.tenant == tenant and j.session_id == session_id))
        dropped = [j for j in jobs if j.tenant == tenant and j.session_id == session_id]
        jobs.clear()
        jobs.extend(kept)
        for job in dropped:
            if job.done is not None and not job.done.done():
                job.done.set_result([])
        return await self._purge_session(tenant, session_id) | {"turns_dropped": len(dropped)}

    async def _purge_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        users = self.users  # type: ignore[attr-defined]
        removed_user = await users.remove(tenant, session_user(session_id))
        windows = units = 0
        for memory in users.loaded():
            if memory.tenant == tenant and memory.units is not None:
                removed = memory.units.remove_session(session_id)
                if removed:
                    memory.dirty = True
                    units += removed
            if memory.tenant == tenant and memory.episodes.sessions.pop(session_id, None) is not None:
                # the user summary is rebuilt from the sessions left, so none of this one's
                # sentences survive in it
                await summarize_user(memory.episodes, self.absorber.summarizer,  # type: ignore[attr-defined]
                                     self._embed_cached, self.config.episodic)  # type: ignore[attr-defined]
                memory.dirty = True
                windows += 1
        if windows or units:
            self._schedule_flush()  # type: ignore[attr-defined]
        return {"object": "memory.session_forgotten", "session_id": session_id,
                "session_user_removed": removed_user, "windows_removed": windows,
                "units_removed": units}


__all__ = ["FORGOTTEN_KEPT", "SessionForgetting", "session_user"]
