"""Which way a replica's requests reach rank 0 (no Ray: a stand-in rank group whose rank 0
serves a real ``RankStreamServer``)."""

from __future__ import annotations

import asyncio
import os

from actors.tp.stream_channel import RankStreamServer
from deployments.llm_server.rank_requests import RankRequests, this_node
from engine.types import RequestOutput


async def generate(prompt, request_id):
    yield RequestOutput(request_id, token_ids=[1], text=prompt, finish_reason="stop")


class Call:
    def __init__(self, answer) -> None:
        self.answer = answer

    def remote(self, *args, **kwargs):
        return self.answer()


class Group:
    def __init__(self, node_id="here", fail=False) -> None:
        self.server: RankStreamServer | None = None
        node_id = this_node() if node_id == "here" else node_id  # Ray may run in this process

        async def open_channel():
            if fail:
                raise RuntimeError("rank 0 is gone")
            self.server = await RankStreamServer(generate).start()
            return {"path": self.server.path, "node_id": node_id}

        self.rank0 = type("Rank0", (), {"open_stream_channel": Call(open_channel)})()


def test_requests_go_over_the_socket_of_the_group_that_serves():
    async def main():
        requests, group, other = RankRequests("socket"), Group(), Group()
        await requests.attach(group)
        outs = [o async for o in requests.stream(group, "r1", "hello", "r1")]
        serves = requests.serves(group), requests.serves(other)
        requests.detach()  # the group is let go: its socket's directory goes (a killed rank
        return outs, serves, requests.serves(group), group.server.path  # cannot remove it)

    outs, (serves, serves_other), after_detach, path = asyncio.run(main())
    assert [o.text for o in outs] == ["hello"] and outs[0].finished
    assert serves and not serves_other and not after_detach
    assert not os.path.exists(os.path.dirname(path))


def test_ray_calls_where_the_socket_cannot_serve():
    async def main():
        on_ray = RankRequests("ray")
        await on_ray.attach(Group())
        elsewhere = RankRequests("socket")
        await elsewhere.attach(Group(node_id="another-node"))  # rank 0 on another node
        broken = RankRequests("socket")
        await broken.attach(Group(fail=True))
        return [r.serves(r._group) if r._group else False for r in (on_ray, elsewhere, broken)]

    assert asyncio.run(main()) == [False, False, False]
