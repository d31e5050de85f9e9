"""Requests and their outputs between a model replica and its rank 0, over a local socket.

A Ray streaming call per request costs both processes about a millisecond of Ray's own work
per request and per streamed output (task submission, the object store, gRPC), on top of the
engine's. The replica and its ranks always share a node (their placement group is
STRICT_PACK), so rank 0 also listens on a Unix socket in a private directory, and the replica
sends each request there and reads its outputs back: length-prefixed pickles, one connection
per replica, the requests multiplexed by id. vLLM's API server and engine core talk the same
way (ZMQ). Ray still starts, supervises and health-checks the ranks; only the request path
moves.

The semantics are those of ``RankActor.generate`` as a Ray call: outputs in order, an error
raised by rank 0 reaches the caller as the same exception, closing the caller's stream cancels
the request in the engine (a ``cancel`` frame), and a replica that goes away cancels all of its
requests (the connection closes). A rank 0 that dies ends every open stream with
``RankStreamLost``.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

from cluster.errors import MAIError
from cluster.logging_setup import get_logger

log = get_logger("actors.tp.stream_channel")

_HEADER = struct.Struct("!I")
_DIR_PREFIX = "m-ai-rank-"
_SOCKET_NAME = "requests.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes on Linux
_END = object()  # the queue marker of a stream whose rank went away


class RankStreamLost(ConnectionError):
    """Rank 0's end of the channel closed while a request was open (the rank died)."""


def _frame(message: tuple) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def _read(reader: asyncio.StreamReader) -> tuple:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the caller's error handling keys on its type)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return MAIError(f"{type(exc).__name__}: {exc}")


# -- rank 0's side -----------------------------------------------------------------------------


class RankStreamServer:
    """Serves ``generate(*args, **kwargs) -> async iterator of outputs`` on a Unix socket."""

    def __init__(self, generate: Callable[..., AsyncIterator[Any]], parent: str | None = None) -> None:
        self.generate = generate
        # 0700: only this user connects. A rank that is killed cannot remove it, so it lives in
        # ``parent`` (Ray's session directory, which goes with the session) and the replica
        # removes it when it lets the rank group go (``remove_socket_dir``).
        if parent is not None and len(os.path.join(parent, _DIR_PREFIX + "x" * 8, _SOCKET_NAME)) > _MAX_SOCKET_PATH:
            parent = None
        self._dir = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=parent)
        self.path = os.path.join(self._dir, _SOCKET_NAME)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> RankStreamServer:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: dict[str, asyncio.Task] = {}
        try:
            while True:
                message = await _read(reader)
                if message[0] == "generate":
                    _, rid, args, kwargs = message
                    tasks[rid] = asyncio.ensure_future(self._stream(writer, rid, args, kwargs))
                    tasks[rid].add_done_callback(lambda _t, rid=rid: tasks.pop(rid, None))
                elif message[0] == "cancel":
                    task = tasks.get(message[1])
                    if task is not None:
                        task.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the replica went away
        finally:
            for task in list(tasks.values()):  # its requests free their engine slots now
                task.cancel()
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, rid: str, args: tuple, kwargs: dict) -> None:
        stream = self.generate(*args, **kwargs)
        try:
            async for out in stream:
                writer.write(_frame(("out", rid, out)))
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
            writer.write(_frame(("end", rid)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            if not writer.is_closing():
                writer.write(_frame(("error", rid, _portable(exc))))
        finally:
            await stream.aclose()


def remove_socket_dir(path: str) -> None:
    """Remove the private directory of the channel at ``path`` (a rank that was killed left it)."""
    directory = os.path.dirname(path)
    if os.path.basename(path) == _SOCKET_NAME and os.path.basename(directory).startswith(_DIR_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)


# -- the replica's side ------------------------------------------------------------------------


class RankStreamClient:
    """The replica's connection to rank 0's ``RankStreamServer``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._streams: dict[str, asyncio.Queue] = {}
        self._lost: str | None = None
        self._pump = asyncio.ensure_future(self._dispatch())

    @classmethod
    async def connect(cls, path: str) -> RankStreamClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def close(self) -> None:
        self._pump.cancel()
        self._writer.close()

    async def _dispatch(self) -> None:
        try:
            while True:
                message = await _read(self._reader)
                queue = self._streams.get(message[1])
                if queue is not None:
                    queue.put_nowait(message)
        except asyncio.CancelledError:
            self._lost = "closed"
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._lost = f"rank 0's request channel closed ({type(exc).__name__})"
        except Exception as exc:  # a frame that cannot be read: the channel is unusable
            self._lost = f"rank 0's request channel failed: {type(exc).__name__}: {exc}"
            log.error("rank stream channel failed", exc_info=True)
        finally:
            for queue in self._streams.values():
                queue.put_nowait(_END)

    async def generate(self, request_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """``RankActor.generate(*args, **kwargs)`` of request ``request_id`` on rank 0."""
        if self._lost is not None:
            raise RankStreamLost(self._lost)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            self._writer.write(_frame(("generate", request_id, args, kwargs)))
            while True:
                message = await queue.get()
                if message is _END:
                    raise RankStreamLost(self._lost or "closed")
                if message[0] == "end":
                    finished = True
                    return
                if message[0] == "error":
                    finished = True
                    raise message[2]
                # after the final output rank 0 has nothing left to cancel
                finished = bool(getattr(message[2], "finished", False))
                yield message[2]
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._lost is None and not self._writer.is_closing():
                self._writer.write(_frame(("cancel", request_id)))


__all__ = ["RankStreamClient", "RankStreamLost", "RankStreamServer"]
