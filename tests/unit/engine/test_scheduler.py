"""The iteration-level scheduler and the dense KV slots, with fake capacity and no model.

``FakeRunner`` stands in for the model runner: it keeps a fake KV cache (one row of token ids
per slot), applies the slot moves, checks that every scheduled sequence finds exactly its own
earlier tokens in its slot (what attention would read), and writes the step's tokens there.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from cluster.errors import CapacityError, ConfigError, InvalidRequestError, MAIError
from engine.rank.kv_slots import SlotAllocator
from engine.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, max_tokens: int = 8, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + prompt_len)), max_tokens)


class FakeRunner:
    """A fake KV cache: ``cache[slot][pos]`` holds the token whose KV sits there."""

    def __init__(self, sched: Scheduler, rng: random.Random | None = None) -> None:
        self.sched = sched
        self.rng = rng or random.Random(0)
        self.cache = [[None] * sched.max_model_len for _ in range(sched.max_num_seqs)]

    def forward(self, out: SchedulerOutput) -> dict[str, int]:
        used = out.num_slots_used
        for src, dst in out.slot_moves:
            assert src > dst and dst < used, (src, dst, used)
            self.cache[dst] = list(self.cache[src])
        assert out.num_batched_tokens == len(out.decode) + sum(c.length for c in out.prefill)
        assert out.num_batched_tokens <= self.sched.max_batched_tokens
        # After the moves every slot holder finds all its computed tokens in its slot.
        with self.sched._lock:
            check_dense(self.sched)
            for seq in self.sched._slot_owner[:used]:
                n = seq.num_computed_tokens
                assert self.cache[seq.slot][:n] == seq.all_token_ids[:n], seq.request_id
        slots = [s.slot for s in out.decode] + [c.seq.slot for c in out.prefill]
        assert len(set(slots)) == len(slots) and all(0 <= s < used for s in slots)
        assert [s.slot for s in out.decode] == sorted(s.slot for s in out.decode)
        sampled = {}
        for seq in out.decode:
            tokens, pos = seq.all_token_ids, seq.num_tokens - 1
            assert seq.num_computed_tokens == pos
            assert self.cache[seq.slot][:pos] == tokens[:pos], seq.request_id
            self.cache[seq.slot][pos] = tokens[pos]
            sampled[seq.request_id] = self.rng.randrange(32000)
        for chunk in out.prefill:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
            assert start == seq.num_computed_tokens and end <= seq.num_prompt_tokens
            assert self.cache[seq.slot][:start] == seq.prompt_token_ids[:start]
            self.cache[seq.slot][start:end] = seq.prompt_token_ids[start:end]
            if chunk.completes_prompt:
                sampled[seq.request_id] = self.rng.randrange(32000)
        return sampled

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.sched.update(out, self.forward(out))
        return out


def check_dense(sched: Scheduler) -> None:
    """Slots 0..n-1 are owned, each owner knows its slot, and every running sequence has one.

    During a step a sequence aborted by another thread keeps its slot until ``update``.
    """
    used, owners = sched.num_slots_used, sched._slot_owner
    assert all(owners[i] is not None and owners[i].slot == i for i in range(used))
    assert all(owner is None for owner in owners[used:])
    running = list(sched._running.values())
    assert all(seq.slot is not None and owners[seq.slot] is seq for seq in running)
    if not sched._step_in_flight:
        assert len(running) == used


# ---------------------------------------------------------------------- slot allocator


def test_slot_allocator_is_dense_and_reports_moves():
    alloc = SlotAllocator(4)
    assert [alloc.allocate() for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(CapacityError):
        alloc.allocate()
    assert alloc.release(1) == (3, 1)  # last slot fills the hole
    assert alloc.release(2) is None  # 2 is now the last used slot
    assert (alloc.used, alloc.free, alloc.num_slots) == (2, 2, 4)
    assert alloc.allocate() == 2
    with pytest.raises(MAIError):
        alloc.release(3)
    with pytest.raises(ConfigError):
        SlotAllocator(0)


# ---------------------------------------------------------------------- property test


@pytest.mark.parametrize("seed", range(6))
def test_random_add_finish_abort_keeps_slots_dense_and_kv_in_place(seed):
    rng = random.Random(seed)
    sched = Scheduler(
        max_num_seqs=6, max_batched_tokens=24, max_model_len=64, max_queued_requests=50
    )
    runner = FakeRunner(sched, rng)
    next_id = 0
    finished_by_length = 0

    def add_some():
        nonlocal next_id
        for _ in range(rng.randrange(3)):
            prompt = rng.randrange(1, 40)
            seq = make_seq(
                f"r{next_id}", prompt, rng.randrange(1, 64 - prompt + 1), rng.randrange(1000)
            )
            next_id += 1
            try:
                sched.add(seq)
            except CapacityError:
                pass

    def drop_some(op):
        ids = list(sched._running) + list(sched._waiting)
        for rid in rng.sample(ids, k=min(len(ids), rng.randrange(3))):
            op(rid)

    for _ in range(400):
        add_some()
        out = sched.schedule()
        sampled = runner.forward(out)
        if rng.random() < 0.3:  # a cancel from another thread while the step is in flight
            drop_some(sched.abort)
            add_some()
        sched.update(out, sampled)
        for seq in out.decode + [c.seq for c in out.prefill]:
            finished_by_length += seq.finish_reason == "length"
        if rng.random() < 0.3:  # the engine's stop decisions after the step
            drop_some(lambda rid: sched.finish(rid, "stop"))
        check_dense(sched)
    assert next_id > 100 and finished_by_length > 10


def test_moves_are_reduced_to_one_copy_per_moved_sequence():
    sched = Scheduler(
        max_num_seqs=4, max_batched_tokens=64, max_model_len=64, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    for i in range(4):
        sched.add(make_seq(f"s{i}", 3, 20, first=10 * i))
    runner.step()
    runner.step()
    sched.finish("s1", "stop")  # s3 moves 3 -> 1
    sched.finish("s3", "stop")  # s3 (now in 1) is gone too: s2 moves 2 -> 1
    assert sched.get("s2").slot == 1
    out = runner.step()
    assert out.slot_moves == [(2, 1)]
    check_dense(sched)


# ---------------------------------------------------------------------- policy


def test_chunked_prefill_splits_a_prompt_into_budget_sized_chunks():
    sched = Scheduler(
        max_num_seqs=2, max_batched_tokens=32, max_model_len=200, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    seq = make_seq("long", 100, 5)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out = runner.step()
        assert not out.decode and len(out.prefill) == 1
        chunks.append(
            (out.prefill[0].start, out.prefill[0].length, out.prefill[0].completes_prompt)
        )
        assert len(seq.output_token_ids) == (1 if chunks[-1][2] else 0)
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    out = runner.step()
    assert out.decode == [seq] and not out.prefill and seq.num_computed_tokens == 101


def test_decode_is_never_starved_by_a_long_prompt():
    sched = Scheduler(
        max_num_seqs=4, max_batched_tokens=64, max_model_len=4096, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    a, b = make_seq("a", 5, 50), make_seq("b", 7, 50)
    sched.add(a)
    sched.add(b)
    runner.step()
    long = make_seq("long", 3000, 10)
    sched.add(long)
    steps = 0
    while long.is_prefilling:
        out = runner.step()
        steps += 1
        assert {s.request_id for s in out.decode} == {"a", "b"}
        assert out.prefill[0].seq is long and out.prefill[0].length <= 62
        assert out.num_batched_tokens <= 64
    assert steps == -(-3000 // 62)
    assert len(a.output_token_ids) == 1 + steps  # one token per step, none skipped


def test_limits_max_num_seqs_and_token_budget():
    sched = Scheduler(
        max_num_seqs=2, max_batched_tokens=16, max_model_len=64, max_queued_requests=8
    )
    for i in range(3):
        sched.add(make_seq(f"s{i}", 10, 4))
    out = sched.schedule()
    # s0 fits whole, s1 gets the 6 tokens left; s2 has neither slot nor budget.
    assert [(c.seq.request_id, c.start, c.length) for c in out.prefill] == [
        ("s0", 0, 10),
        ("s1", 0, 6),
    ]
    assert out.num_batched_tokens == 16 and sched.num_running == 2 and sched.num_waiting == 1
    sched.update(out, {"s0": 1})
    out = sched.schedule()
    assert [s.request_id for s in out.decode] == ["s0"]
    assert [(c.seq.request_id, c.start, c.length) for c in out.prefill] == [("s1", 6, 4)]
    assert sched.num_running == 2 and sched.num_waiting == 1  # no slot for s2


def test_queue_full_raises_capacity_error_with_retry_after():
    sched = Scheduler(
        max_num_seqs=1,
        max_batched_tokens=8,
        max_model_len=64,
        max_queued_requests=1,
        retry_after_s=2.5,
    )
    sched.add(make_seq("a", 4))  # takes the free slot at the next step
    sched.add(make_seq("b", 4))  # queued
    with pytest.raises(CapacityError) as err:
        sched.add(make_seq("c", 4))
    assert err.value.retry_after == 2.5 and "max_queued_requests=1" in err.value.message
    sched.schedule()  # a is running now; still one queued
    with pytest.raises(CapacityError):
        sched.add(make_seq("c", 4))
    sched.abort("b")
    sched.add(make_seq("c", 4))


def test_requests_that_cannot_fit_are_invalid_and_name_the_numbers():
    sched = Scheduler(
        max_num_seqs=2, max_batched_tokens=8, max_model_len=100, max_queued_requests=2
    )
    with pytest.raises(InvalidRequestError) as err:
        sched.add(make_seq("x", 90, 20))
    msg = err.value.message
    assert "90" in msg and "max_tokens=20" in msg and "max_model_len=100" in msg and "<= 10" in msg
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        sched.add(make_seq("y", 100, 1))
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError):
        sched.add(make_seq("z", 0, 1))
    sched.add(make_seq("ok", 90, 10))  # exactly max_model_len
    with pytest.raises(InvalidRequestError):
        sched.add(make_seq("ok", 3, 1))  # duplicate id
    assert sched.num_waiting == 1


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="max_batched_tokens=4 is below max_num_seqs=8"):
        Scheduler(max_num_seqs=8, max_batched_tokens=4, max_model_len=64, max_queued_requests=0)


def test_abort_waiting_and_running():
    sched = Scheduler(
        max_num_seqs=2, max_batched_tokens=64, max_model_len=64, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    for rid in ("a", "b", "c"):
        sched.add(make_seq(rid, 4, 10))
    runner.step()
    c = sched.abort("c")  # waiting
    assert (
        c.status is SequenceStatus.FINISHED
        and c.finish_reason == "abort"
        and sched.num_waiting == 0
    )
    a = sched.abort("a")  # running, slot 0: b moves from slot 1 at once
    assert a.finish_reason == "abort" and a.slot is None and sched.num_slots_used == 1
    assert sched.get("b").slot == 0 and sched.get("a") is None
    assert sched.abort("a") is None and sched.abort("nope") is None
    out = runner.step()
    assert out.slot_moves == [(1, 0)] and [s.request_id for s in out.decode] == ["b"]
    check_dense(sched)


def test_abort_during_a_step_keeps_the_step_slots_until_update():
    sched = Scheduler(
        max_num_seqs=3, max_batched_tokens=64, max_model_len=64, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    for rid in ("a", "b", "c"):
        sched.add(make_seq(rid, 4, 10))
    runner.step()
    out = sched.schedule()
    sampled = runner.forward(out)
    a = sched.abort("a")
    assert a.is_finished and a.slot == 0 and sched.get("c").slot == 2  # nothing moved yet
    sched.update(out, sampled)
    assert a.output_token_ids == [a.output_token_ids[0]]  # the in-flight token was dropped
    assert a.slot is None and sched.get("c").slot == 0
    assert runner.step().slot_moves == [(2, 0)]
    check_dense(sched)


def test_length_finish_frees_the_slot():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=64, max_model_len=8, max_queued_requests=4)
    runner = FakeRunner(sched)
    seq = make_seq("a", 5, 3)  # 5 + 3 == max_model_len
    sched.add(seq)
    for _ in range(3):
        assert not seq.is_finished
        runner.step()
    assert seq.finish_reason == "length" and len(seq.output_token_ids) == 3
    assert seq.num_tokens == 8 and sched.num_slots_used == 0 and not sched.has_work
    assert sched.schedule().is_empty
    short = make_seq("b", 2, 3)  # max_tokens reached well inside max_model_len
    sched.add(short)
    for _ in range(3):
        runner.step()
    assert short.finish_reason == "length" and short.num_tokens == 5


def test_engine_finish_and_missing_token_rerun():
    sched = Scheduler(
        max_num_seqs=2, max_batched_tokens=64, max_model_len=64, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    sched.add(make_seq("a", 4, 10))
    runner.step()
    out = sched.schedule()
    sched.update(out, {})  # no token for a: it runs the same position again
    seq = sched.get("a")
    assert len(seq.output_token_ids) == 1 and seq.num_computed_tokens == 4
    out = runner.step()
    assert out.decode == [seq] and len(seq.output_token_ids) == 2
    sched.finish("a", "stop")
    assert seq.finish_reason == "stop" and sched.num_running == 0
    b = make_seq("b", 4, 10)
    sched.add(b)
    out = sched.schedule()
    runner.forward(out)
    sched.update(out, {})  # the prompt ran but no token was sampled
    assert b.output_token_ids == [] and b.is_prefilling
    out = runner.step()  # the last prompt token runs again, and samples
    assert [(c.start, c.length) for c in out.prefill] == [(3, 1)] and len(b.output_token_ids) == 1
    sched.finish("a", "length")  # already done: ignored
    assert seq.finish_reason == "stop"


def test_fcfs_admission_order():
    sched = Scheduler(max_num_seqs=1, max_batched_tokens=8, max_model_len=64, max_queued_requests=8)
    runner = FakeRunner(sched)
    names = ["r3", "r1", "r4", "r0", "r2"]
    for rid in names:
        sched.add(make_seq(rid, 3, 2))
    admitted = []
    while sched.has_work:
        out = runner.step()
        admitted += [c.seq.request_id for c in out.prefill if c.start == 0]
    assert admitted == names


def test_concurrent_add_and_abort_from_other_threads():
    sched = Scheduler(
        max_num_seqs=8, max_batched_tokens=32, max_model_len=64, max_queued_requests=16
    )
    runner = FakeRunner(sched)
    stop = threading.Event()

    def client(tid: int):
        rng = random.Random(tid)
        i = 0
        while not stop.is_set():
            rid = f"t{tid}-{i}"
            i += 1
            try:
                sched.add(make_seq(rid, rng.randrange(1, 30), rng.randrange(1, 30)))
            except CapacityError:
                pass
            if rng.random() < 0.5:
                sched.abort(rid)
            stop.wait(0.0005)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    admitted = 0
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            out = runner.step()
            time.sleep(0.0002)
            admitted += sum(c.start == 0 for c in out.prefill)
            with sched._lock:  # a consistent snapshot for the check
                check_dense(sched)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert admitted > 20
