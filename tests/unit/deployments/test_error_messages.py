"""What clients read when something fails: never a stack trace, never terminal colours,
the exception's own line kept; a Ray task error unwrapped down to the error it carries."""

from __future__ import annotations

import pytest

from cluster.errors import EngineDeadError, MAIError
from deployments.errors import as_mai_error, brief, error_response

SERVE_MESSAGE = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its "
    "constructor or initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:app:llm-m-ai-tiny.initialize_and_get_metadata()\x1b[39m "
    "(pid=13525, ip=127.0.0.1, actor_id=ce3b, repr=<ServeReplica object at 0x7f>)\n"
    '  File "/usr/lib/python3.11/concurrent/futures/_base.py", line 449, in result\n'
    "    return self.__get_result()\n"
    "           ^^^^^^^^^^^^^^^^^^^\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/srv/deployments/llm_server.py", line 94, in __init__\n'
    "    await self.shards.wait_loaded(self.serving.rank_start_timeout_s)\n"
    "ray.exceptions.RayTaskError(TypeError): \x1b[36mray::RankActor.load()\x1b[39m (pid=1, ip=127.0.0.1)\n"
    '  File "/srv/actors/shard.py", line 99, in load\n'
    "TypeError: FakeEngine.__init__() got an unexpected keyword argument 'no_such_option'\n"
)


def test_brief_keeps_the_summary_and_the_exception_and_drops_the_trace():
    text = brief(SERVE_MESSAGE)
    assert text.startswith("The deployment failed to start 3 times in a row.")
    assert text.endswith("TypeError: FakeEngine.__init__() got an unexpected keyword argument 'no_such_option'")
    for leak in ("Traceback", 'File "', "/srv/", "pid=", "\x1b", "\n", "^^^"):
        assert leak not in text


def test_brief_leaves_plain_messages_alone_and_caps_long_ones():
    assert brief("model m-ai-tiny: 0 running replicas") == "model m-ai-tiny: 0 running replicas"
    assert len(brief("x" * 5000)) == 500


def test_an_unexpected_error_is_a_500_without_its_trace():
    class Weird(Exception):
        pass

    error = as_mai_error(Weird(SERVE_MESSAGE))
    assert type(error) is MAIError and error.status_code == 500
    assert "Traceback" not in error.message and error.message.startswith("internal error: Weird:")
    response = error_response(Weird("boom"))
    assert response.status_code == 500 and b"Traceback" not in response.body


def test_nested_ray_task_errors_are_unwrapped_to_the_cause():
    ray = pytest.importorskip("ray")
    inner = ray.exceptions.RayTaskError("f", "trace", EngineDeadError("rank 1 is dead"))
    outer = ray.exceptions.RayTaskError("g", "trace", inner)
    error = as_mai_error(outer)
    assert isinstance(error, EngineDeadError) and error.message == "rank 1 is dead"
