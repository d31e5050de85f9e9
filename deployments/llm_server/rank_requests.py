"""How a model replica sends one request to its rank 0 and reads the outputs back.

``serving.rank_channel: socket`` (default): over rank 0's local request channel
(``actors/tp/stream_channel.py``), opened when a rank group starts serving; until it is open,
or where rank 0 runs on another node, or after the channel broke, a request goes as a Ray
streaming call (``RankActor.generate.remote``), as with ``rank_channel: ray``. Either way the
caller gets the outputs in order, rank 0's errors as raised there (a Ray call's wrapped in
Ray's task error), and closing the stream cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from actors.tp.stream_channel import RankStreamClient, remove_socket_dir
from cluster.logging_setup import get_logger
from engine.types import RequestOutput

log = get_logger("deployments.llm_server.rank_requests")


def this_node() -> str | None:
    """Ray's id of this process's node (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class RankRequests:
    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._group: Any = None  # the rank group the client below talks to
        self._client: RankStreamClient | None = None
        self._path: str | None = None  # where that client connected

    def serves(self, group: Any) -> bool:
        """Whether requests to rank 0 of ``group`` go over its socket now."""
        return group is self._group and self._client is not None and not self._client.lost

    async def attach(self, group: Any) -> None:
        """Open rank 0's channel of ``group`` (a rank group that now serves); a failure leaves
        its requests on Ray calls."""
        self.detach()
        if self.channel != "socket":
            return
        try:
            info = await group.rank0.open_stream_channel.remote()
            here = this_node()
            if info.get("node_id") != here:
                log.warning("rank 0 runs on another node; its requests go as Ray calls",
                            extra={"rank_node": info.get("node_id"), "replica_node": here})
                return
            client = await RankStreamClient.connect(info["path"])
        except Exception:
            log.warning("rank 0's request channel could not be opened; its requests go as Ray calls",
                        exc_info=True)
            return
        self._group, self._client, self._path = group, client, info["path"]

    def detach(self) -> None:
        """Close the channel of the rank group that served until now (it is dead, replaced or
        stopping with this replica) and remove its socket's directory, which a killed rank
        cannot remove itself."""
        client, self._group, self._client = self._client, None, None
        path, self._path = self._path, None
        if path is not None:
            remove_socket_dir(path)
        if client is not None:
            try:
                client.close()
            except RuntimeError:  # the event loop is gone (the replica is stopping)
                pass

    def stream(self, group: Any, request_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """``RankActor.generate(*args, **kwargs)`` of request ``request_id`` on rank 0 of ``group``."""
        if self.serves(group):
            return self._client.generate(request_id, *args, **kwargs)
        return _ray_stream(group.rank0, args, kwargs)


async def interleave(streams: dict[int, AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(key, output)`` of several streams as they come (the choices of one request); the
    first error ends them all and is raised; closing this closes every stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(key: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((key, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((key, exc))
        finally:
            queue.put_nowait((key, None))

    tasks = [asyncio.ensure_future(pump(key, stream)) for key, stream in streams.items()]
    try:
        done = 0
        while done < len(tasks):
            key, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield key, item
    finally:
        for task in tasks:
            task.cancel()


async def _ray_stream(rank0: Any, args: tuple, kwargs: dict) -> AsyncIterator[RequestOutput]:
    import ray

    refs = rank0.generate.remote(*args, **kwargs)
    finished = False
    try:
        async for ref in refs:
            out: RequestOutput = await ref
            finished = out.finished
            yield out
            if finished:
                return
    finally:
        if not finished:
            ray.cancel(refs)


__all__ = ["RankRequests", "interleave", "this_node"]
