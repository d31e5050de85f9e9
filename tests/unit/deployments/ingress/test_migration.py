"""The ingress's side of mid-stream migration (``deployments.ingress.migration``): which
failures are resumed, what a resumption carries, and the bounds (tries, tokens, wait)."""

from __future__ import annotations

import asyncio

import pytest
import ray.exceptions

from cluster.config.migration import MigrationConfig
from cluster.errors import EngineDeadError, InvalidRequestError
from deployments.ingress.migration import StreamMigration
from deployments.messages import ChoiceDelta, ModelRequest, SessionContext
from deployments.protocol import ChatCompletionRequest
from engine.types import RequestOutput


def message(n: int = 1, stream: bool = True) -> ModelRequest:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=n)
    return ModelRequest(SessionContext(body), "t", stream=stream)


def delta(index: int, *ids: int, finish: str | None = None) -> ChoiceDelta:
    return ChoiceDelta(index, RequestOutput("r", token_ids=list(ids), text="x" * len(ids), finish_reason=finish))


class Replicas:
    """``send``: each call gets the next script, a list of deltas and exceptions (or "hang")."""

    def __init__(self, *scripts: list) -> None:
        self.scripts = list(scripts)
        self.sent: list[ModelRequest] = []
        self.cancelled = 0

    def send(self, request: ModelRequest):
        self.sent.append(request)
        script = self.scripts.pop(0)
        replicas = self

        class Response:
            def cancel(self) -> None:
                replicas.cancelled += 1

            def __aiter__(self):
                return self.items()

            async def items(self):
                for item in script:
                    if item == "hang":
                        await asyncio.sleep(3600)
                    if isinstance(item, BaseException):
                        raise item
                    yield item

        return Response()


def run(migration: StreamMigration, replicas: Replicas, request: ModelRequest | None = None):
    async def go():
        return [d async for d in migration.deltas(request or message(), replicas.send)]

    return asyncio.run(go())


def migration(records: list | None = None, **config) -> StreamMigration:
    return StreamMigration(MigrationConfig(**config), lambda *a: (records if records is not None else []).append(a))


def test_a_replica_death_resumes_with_the_tokens_already_sent():
    records: list = []
    replicas = Replicas([delta(0, 1, 2), delta(0, 3), ray.exceptions.ActorDiedError()],
                        [delta(0, 4), delta(0, 5, finish="length")])
    got = run(migration(records), replicas)
    assert [t for d in got for t in d.output.token_ids] == [1, 2, 3, 4, 5]
    first, second = replicas.sent
    assert first.resume is None and second.resume == {0: [1, 2, 3]}
    assert second.request_id == first.request_id and second.choice_id(0) != first.choice_id(0)
    assert [r[0] for r in records] == ["resumed"] and records[0][2] >= 0


def test_a_whole_answer_is_sent_again_and_streamed_from_the_new_replica():
    """Deltas paced from the new replica: ``wait_s`` bounds its first token, not the whole answer."""
    replicas = Replicas([ray.exceptions.ActorDiedError()], [delta(0, 1), delta(0, 2, finish="length")])
    got = run(migration(), replicas, message(stream=False))
    assert [t for d in got for t in d.output.token_ids] == [1, 2]
    assert replicas.sent[1].resume == {0: []} and replicas.sent[1].stream


def test_only_unfinished_choices_are_resumed():
    replicas = Replicas([delta(0, 1, finish="stop"), delta(1, 7), ray.exceptions.ActorUnavailableError("gone", None)],
                        [delta(1, 8, finish="length")])
    got = run(migration(), replicas, message(n=2))
    assert replicas.sent[1].resume == {1: [7]}
    assert [(d.index, d.output.token_ids) for d in got] == [(0, [1]), (1, [7]), (1, [8])]


@pytest.mark.parametrize("error", [InvalidRequestError("bad"), EngineDeadError("the engine failed this request"),
                                   ray.exceptions.RayTaskError("generate", "tb", ValueError("x"))])
def test_errors_of_a_replica_that_ran_are_not_migrated(error):
    replicas = Replicas([delta(0, 1), error])
    with pytest.raises(type(error)):
        run(migration(), replicas)
    assert len(replicas.sent) == 1


@pytest.mark.parametrize("config, outcome", [
    (dict(enabled=False), "disabled"),
    (dict(max_tokens=2), "max_tokens"),
    (dict(max_tries=1), "max_tries"),
])
def test_the_bounds_end_the_stream_with_the_replicas_error(config, outcome):
    records: list = []
    replicas = Replicas([delta(0, 1, 2, 3), ray.exceptions.ActorDiedError()],
                        [delta(0, 4), ray.exceptions.ActorDiedError()], [delta(0, 5, finish="length")])
    with pytest.raises(ray.exceptions.ActorDiedError):
        run(migration(records, **config), replicas)
    assert records[-1][:2] == (outcome, "m")


def test_a_resumption_waits_for_a_live_replica_within_wait_s():
    died = ray.exceptions.ActorDiedError
    # the router still picks the dead replica twice, then a live one answers
    replicas = Replicas([delta(0, 1), died()], [died()], [died()], [delta(0, 2, finish="length")])
    got = run(migration(max_tries=1, wait_s=5), replicas)
    assert [t for d in got for t in d.output.token_ids] == [1, 2]
    assert [r.resume for r in replicas.sent[1:]] == [{0: [1]}] * 3


def test_no_replica_within_wait_s_ends_the_stream_and_cancels_the_call():
    records: list = []
    replicas = Replicas([delta(0, 1), ray.exceptions.ActorDiedError()], ["hang"])
    with pytest.raises(ray.exceptions.ActorDiedError):
        run(migration(records, wait_s=0.3), replicas)
    assert records[-1][0] == "wait_s" and replicas.cancelled == 1


def test_closing_the_stream_cancels_the_running_call_and_does_not_migrate():
    replicas = Replicas([delta(0, 1), "hang"])

    async def go():
        stream = migration().deltas(message(), replicas.send)
        await anext(stream)
        await stream.aclose()

    asyncio.run(go())
    assert replicas.cancelled == 1 and len(replicas.sent) == 1
