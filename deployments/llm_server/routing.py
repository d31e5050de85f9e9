"""Session affinity for the model deployments: a session's turns reach the replica whose
prefix cache holds the blocks of its earlier turns.

Serve's default router picks the less loaded of two random replicas, so with R replicas a
session's next turn lands on the replica that cached its prompt 1/R of the time, and its whole
history is prefilled again. This router hashes the session id (``handle.options(session_id=...)``,
which the ingress sets for requests of a session) on a consistent-hash ring of the replicas:

- rank 1: the session's replica;
- rank 2: the less loaded of two other random replicas, taken when the session's replica is
  full (``max_ongoing_requests``) or gone; a removed replica moves only its own sessions.

Requests without a session get Serve's usual power of two choices. Enabled by
``serving.session_affinity`` (on by default).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster.hash_ring import HashRing


def _two_of(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(replicas, min(2, len(replicas)))


class SessionAffinityRouter(RequestRouter):
    """Consistent hash on the session id, power of two choices otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ring = HashRing()
        super().__init__(*args, **kwargs)

    def initialize_state(self, virtual_nodes: int = 100, **kwargs: Any) -> None:
        self.ring = HashRing(self.ring.members, virtual_nodes=virtual_nodes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.ring.update(r.replica_id.unique_id for r in replicas)

    def _session_replica(self, session_id: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The first replica clockwise from the session's hash that is a candidate now."""
        by_id = {r.replica_id.unique_id: r for r in candidates}
        for unique_id in self.ring.lookup(session_id, len(self.ring.members)):
            if unique_id in by_id:
                return by_id[unique_id]
        return None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        session_id = pending_request.metadata.session_id if pending_request is not None else ""
        if not session_id:
            return [_two_of(candidate_replicas)]
        home = self._session_replica(session_id, candidate_replicas)
        if home is None:
            return [_two_of(candidate_replicas)]
        others = [r for r in candidate_replicas if r is not home]
        return [[home], _two_of(others)] if others else [[home]]


__all__ = ["SessionAffinityRouter"]
