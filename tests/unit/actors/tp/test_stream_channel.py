"""Rank 0's local request channel: a real Unix socket between a server and a client in one
event loop, with a stand-in for ``RankActor.generate``."""

from __future__ import annotations

import asyncio
import os

import pytest

from actors.tp.stream_channel import (
    RankStreamClient,
    RankStreamLost,
    RankStreamServer,
    remove_socket_dir,
)
from cluster.errors import CapacityError, MAIError
from engine.types import RequestOutput


class Rank:
    """``generate(prompt, n, request_id)``: n outputs, the last finished; records closes."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.gate = asyncio.Event()

    async def generate(self, prompt: str, n: int, request_id: str, *, fail: str | None = None, wait: bool = False):
        try:
            if fail == "capacity":
                raise CapacityError("the queue is full", retry_after=3.0)
            if fail == "unpicklable":
                raise ValueError(lambda: None)
            for i in range(n):
                if wait and i == 1:
                    await self.gate.wait()
                yield RequestOutput(request_id, token_ids=[i], text=f"{prompt}{i} ",
                                    finish_reason="length" if i == n - 1 else None)
                await asyncio.sleep(0)
        finally:
            self.closed.append(request_id)


async def pair(rank: Rank) -> tuple[RankStreamServer, RankStreamClient]:
    server = await RankStreamServer(rank.generate).start()
    return server, await RankStreamClient.connect(server.path)


async def until_closed(rank: Rank, request_id: str) -> None:
    """Until the rank's stream of ``request_id`` has closed (at most a second)."""
    for _ in range(100):
        if request_id in rank.closed:
            return
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_outputs_arrive_in_order_and_concurrent_requests_do_not_mix():
    async def main():
        rank = Rank()
        server, client = await pair(rank)

        async def collect(rid, n):
            return [out async for out in client.generate(rid, f"p{rid}-", n, rid)]

        a, b = await asyncio.gather(collect("a", 5), collect("b", 3))
        client.close()
        server.close()
        return a, b

    a, b = run(main())
    assert [o.text for o in a] == [f"pa-{i} " for i in range(5)] and a[-1].finished
    assert [o.token_ids for o in b] == [[0], [1], [2]] and all(o.request_id == "b" for o in b)


def test_rank_errors_reach_the_caller_with_their_type():
    async def main():
        server, client = await pair(Rank())
        with pytest.raises(CapacityError) as raised:
            async for _ in client.generate("x", "p", 3, "x", fail="capacity"):
                pass
        with pytest.raises(MAIError, match="ValueError"):  # one that cannot be pickled
            async for _ in client.generate("y", "p", 3, "y", fail="unpicklable"):
                pass
        outs = [o async for o in client.generate("z", "p", 2, "z")]  # the channel still works
        client.close()
        server.close()
        return raised.value, outs

    error, outs = run(main())
    assert error.retry_after == 3.0 and len(outs) == 2


def test_a_caller_that_stops_at_the_final_output_sends_no_cancel():
    async def main():
        rank = Rank()
        server, client = await pair(rank)
        cancels = []
        write = client._writer.write
        client._writer.write = lambda data: (cancels.append(data) if b"cancel" in data else None, write(data))
        async for out in client.generate("g", "p", 3, "g"):
            if out.finished:
                break  # as the LLMServer does: it returns after the final output
        await asyncio.sleep(0.05)
        client.close()
        server.close()
        return cancels

    assert run(main()) == []


def test_closing_the_callers_stream_cancels_the_request_on_the_rank():
    async def main():
        rank = Rank()
        server, client = await pair(rank)
        stream = client.generate("c", "p", 100, "c", wait=True)
        first = await anext(stream)
        await stream.aclose()
        await until_closed(rank, "c")
        client.close()
        server.close()
        return first, rank.closed

    first, closed = run(main())
    assert first.token_ids == [0] and closed == ["c"]


def test_a_replica_that_goes_away_cancels_its_requests():
    async def main():
        rank = Rank()
        server, client = await pair(rank)
        stream = client.generate("d", "p", 100, "d", wait=True)
        await anext(stream)
        client.close()  # the replica's connection ends with a request open
        await until_closed(rank, "d")
        server.close()
        return rank.closed

    assert run(main()) == ["d"]


def test_a_rank_that_goes_away_ends_open_streams_with_rank_stream_lost():
    async def main():
        rank = Rank()
        server, client = await pair(rank)
        stream = client.generate("e", "p", 100, "e", wait=True)
        await anext(stream)
        server._server.close()
        for task in asyncio.all_tasks():  # the rank process dies: its connection handlers too
            if task.get_coro().__qualname__.startswith("RankStreamServer._serve"):
                task.cancel()
        with pytest.raises(RankStreamLost):
            await anext(stream)
        with pytest.raises(RankStreamLost):  # and later requests say so at once
            await anext(client.generate("f", "p", 1, "f"))
        lost = client.lost
        server.close()
        return lost

    assert run(main()) is True


def test_the_socket_is_private_and_removed_on_close():
    async def main():
        server = await RankStreamServer(Rank().generate).start()
        mode = os.stat(os.path.dirname(server.path)).st_mode & 0o777
        server.close()
        return mode, os.path.exists(server.path)

    mode, exists = run(main())
    assert mode == 0o700 and not exists


def test_the_socket_lives_in_the_given_directory_and_a_killed_ranks_is_removed_for_it(tmp_path):
    """A rank killed by Ray leaves its socket behind: it lives in Ray's session directory, and
    the replica removes it (``remove_socket_dir``) but nothing that is not a channel's."""

    async def main():
        server = await RankStreamServer(Rank().generate, str(tmp_path)).start()
        inside = os.path.dirname(os.path.dirname(server.path)) == str(tmp_path)
        long_parent = tmp_path / ("d" * 90)
        long_parent.mkdir()
        fallback = await RankStreamServer(Rank().generate, str(long_parent)).start()
        in_long = str(long_parent) in fallback.path
        fallback.close()
        return server, inside, in_long

    server, inside, in_long = run(main())  # never closed: as if killed
    assert inside and os.path.exists(server.path)
    assert not in_long  # a socket path over sun_path's 107 bytes would not bind
    other = tmp_path / "m-ai-rank-data" / "notes.txt"
    other.parent.mkdir()
    other.write_text("x")
    remove_socket_dir(str(other))
    remove_socket_dir(str(tmp_path / "requests.sock"))
    assert other.exists() and tmp_path.exists()
    remove_socket_dir(server.path)
    assert not os.path.exists(os.path.dirname(server.path))
