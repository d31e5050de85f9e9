"""The control channel: a gloo group of its own with its own timeout and typed errors.

Two real processes join a gloo default group (as the CPU forward does) and a control channel;
no model is loaded. A step message crosses intact; a follower that hears nothing from rank 0
within the channel's timeout gets ``ControlTimeoutError`` (an ``EngineDeadError``), not a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta

import pytest

from cluster.net import free_port
from engine.rank import step_messages as msg

PLAN = msg.StepPlan(
    decode_tokens=[11, 12], decode_positions=[5, 9], decode_tables=[[0], [1, 2]],
    prefill=[([1, 2, 3], 0, [3])],
)


def _rank_main(rank: int, port: int, scenario: str, timeout_s: float, results) -> None:
    import torch

    from engine.rank.control_channel import ControlChannel

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )
    channel = ControlChannel.create(rank, timeout_s)
    try:
        if scenario == "roundtrip":
            if rank == 0:
                channel.send(*msg.encode(msg.OP_STEP, PLAN))
                channel.send(*msg.encode(msg.OP_SHUTDOWN))
            else:
                got = [msg.decode(*channel.receive(msg.HEADER_LEN, msg.payload_len)) for _ in range(2)]
                results.put(("ok", channel.backend, got))
        else:  # rank 0 stays silent past the follower's timeout
            if rank == 0:
                time.sleep(timeout_s * 4)
            else:
                started = time.monotonic()
                try:
                    channel.receive(msg.HEADER_LEN, msg.payload_len)
                    results.put(("no error", None, None))
                except Exception as exc:
                    from cluster.errors import EngineDeadError

                    results.put((type(exc).__name__, isinstance(exc, EngineDeadError),
                                 (str(exc), time.monotonic() - started)))
    finally:
        if rank == 1 or scenario == "roundtrip":
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass


def _run(scenario: str, timeout_s: float):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, scenario, timeout_s, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.mark.timeout(180)
def test_a_step_message_crosses_the_gloo_control_channel_intact():
    status, backend, got = _run("roundtrip", 30.0)
    assert status == "ok" and backend == "gloo"
    (op, plan), (last, none) = got
    assert op == msg.OP_STEP and plan == PLAN
    assert last == msg.OP_SHUTDOWN and none is None


@pytest.mark.timeout(180)
def test_a_silent_rank_0_gives_the_follower_a_typed_timeout_error():
    name, is_engine_dead, (text, waited) = _run("silent", 2.0)
    assert name == "ControlTimeoutError" and is_engine_dead
    assert "rank 1" in text and "2s timeout" in text
    assert 1.5 <= waited < 30  # the channel's own timeout, not the default group's 60 s


def test_nccl_errors_are_configured_to_raise_not_abort():
    from engine.rank.control_channel import nccl_error_env

    assert nccl_error_env() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
