"""The iteration-level scheduler and its paged KV blocks, with fake capacity and no model.

``FakeRunner`` stands in for the model runner: it keeps a fake KV pool (the token id whose KV
sits at each position of each block), checks that every scheduled sequence finds exactly its
own earlier tokens through its block table (what attention would read), and writes the step's
tokens there. Shared (prefix-cached) blocks must never be written with other tokens.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from cluster.errors import CapacityError, ConfigError, InvalidRequestError
from engine.scheduling.block_pool import BlockPool
from engine.scheduling.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, max_tokens: int = 8, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + prompt_len)), max_tokens)


class FakeRunner:
    """A fake KV pool: ``kv[block * block_size + offset]`` is the token whose KV sits there."""

    def __init__(self, sched: Scheduler, rng: random.Random | None = None) -> None:
        self.sched = sched
        self.rng = rng or random.Random(0)
        self.bs = sched.block_size
        self.kv = [None] * (sched.pool.num_blocks * self.bs)

    def read(self, seq: Sequence, n: int) -> list:
        bs, table = self.bs, seq.block_table
        return [self.kv[table[p // bs] * bs + p % bs] for p in range(n)]

    def write(self, seq: Sequence, start: int, tokens: list[int]) -> None:
        bs, table = self.bs, seq.block_table
        for p, token in enumerate(tokens, start):
            block = table[p // bs]
            slot = block * bs + p % bs
            if self.sched.pool.ref_count(block) > 1:  # shared: only the same token may land
                assert self.kv[slot] == token, (seq.request_id, p)
            self.kv[slot] = token

    def forward(self, out: SchedulerOutput) -> dict[str, int]:
        assert out.num_batched_tokens == len(out.decode) + sum(c.length for c in out.prefill)
        assert out.num_batched_tokens <= self.sched.max_batched_tokens
        with self.sched._lock:
            check_blocks(self.sched)
        sampled = {}
        for seq in out.decode:
            tokens, pos = seq.all_token_ids, seq.num_tokens - 1
            assert seq.num_computed_tokens == pos
            assert self.read(seq, pos) == tokens[:pos], seq.request_id
            self.write(seq, pos, [tokens[pos]])
            sampled[seq.request_id] = self.rng.randrange(32000)
        for chunk in out.prefill:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
            assert start == seq.num_computed_tokens and end <= seq.prefill_target
            assert self.read(seq, start) == seq.all_token_ids[:start], seq.request_id
            self.write(seq, start, chunk.token_ids)
            if chunk.completes_prompt:
                sampled[seq.request_id] = self.rng.randrange(32000)
        return sampled

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.sched.update(out, self.forward(out))
        return out


def check_blocks(sched: Scheduler) -> None:
    """Reference counts equal the tables holding each block; running sequences hold blocks for
    their computed tokens; waiting ones hold none; nothing is both free and held.

    During a step a sequence aborted by another thread keeps its blocks until ``update``.
    """
    pool = sched.pool
    holders = list(sched._running.values()) + list(sched._deferred_release)
    refs = [0] * pool.num_blocks
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) * sched.block_size >= seq.num_computed_tokens
        for b in seq.block_table:
            refs[b] += 1
    assert refs == [pool.ref_count(b) for b in range(pool.num_blocks)]
    assert pool.num_in_use == sum(r > 0 for r in refs)
    assert all(not seq.block_table for seq in sched._waiting.values())
    assert all(not pool._free[b] for b in range(pool.num_blocks) if refs[b])
    assert pool.num_available + pool.num_in_use == pool.num_blocks
    assert len(sched._running) <= sched.max_num_seqs


# ---------------------------------------------------------------------- block pool


def test_block_pool_counts_references_and_keeps_cached_blocks_until_needed():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate(after=0)
    assert (a, b) == (0, 1) and pool.num_in_use == 2 and pool.usage == 0.5
    pool.register(a, 111)
    pool.take([a])  # a second sequence shares block a
    pool.release([a, b])
    assert pool.ref_count(a) == 1 and pool.num_available == 3
    pool.release([a])  # cached: kept with its KV, evictable
    assert pool.lookup([111, 222]) == [a] and pool.num_available == 4 and pool.num_in_use == 0
    assert pool.cost([a]) == 1
    got = [pool.allocate() for _ in range(3)]
    assert a not in got  # never-keyed blocks go first
    assert pool.allocate() == a and pool.lookup([111]) == []  # then the cached one is evicted
    assert pool.allocate() is None and pool.evictions == 1
    with pytest.raises(ConfigError):
        BlockPool(0, 16)


# ---------------------------------------------------------------------- property test


@pytest.mark.parametrize("seed", range(6))
def test_random_add_finish_abort_preempt_keeps_blocks_and_kv_consistent(seed):
    rng = random.Random(seed)
    # 20 blocks of 4 tokens for up to 6 sequences of up to 64: preemption happens often
    sched = Scheduler(
        max_num_seqs=6, max_batched_tokens=24, max_model_len=64, max_queued_requests=50,
        block_size=4, num_kv_blocks=20,
    )
    runner = FakeRunner(sched, rng)
    next_id = 0
    finished_by_length = 0

    def add_some():
        nonlocal next_id
        for _ in range(rng.randrange(3)):
            prompt = rng.randrange(1, 40)
            # few distinct starts, so prompts share prefixes
            seq = make_seq(
                f"r{next_id}", prompt, rng.randrange(1, 64 - prompt + 1), rng.choice([0, 500])
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
        check_blocks(sched)
    assert next_id > 100 and finished_by_length > 10
    assert sched.num_preemptions > 5 and sched.prefix_hits > 0


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
    assert sched.num_running == 2 and sched.num_waiting == 1  # no room for s2


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
    a = sched.abort("a")  # running: its block goes back at once
    assert a.finish_reason == "abort" and a.block_table == [] and sched.pool.num_in_use == 1
    assert sched.get("a") is None
    assert sched.abort("a") is None and sched.abort("nope") is None
    out = runner.step()
    assert [s.request_id for s in out.decode] == ["b"]
    check_blocks(sched)


def test_abort_during_a_step_keeps_the_step_blocks_until_update():
    sched = Scheduler(
        max_num_seqs=3, max_batched_tokens=64, max_model_len=64, max_queued_requests=4
    )
    runner = FakeRunner(sched)
    for rid in ("a", "b", "c"):
        sched.add(make_seq(rid, 4, 10))
    runner.step()
    out = sched.schedule()
    sampled = runner.forward(out)
    held = list(sched.get("a").block_table)
    a = sched.abort("a")
    assert a.is_finished and a.block_table == held and sched.pool.ref_count(held[0]) == 1
    sched.update(out, sampled)
    assert a.output_token_ids == [a.output_token_ids[0]]  # the in-flight token was dropped
    assert a.block_table == [] and sched.pool.ref_count(held[0]) == 0
    runner.step()
    check_blocks(sched)


def test_length_finish_frees_the_blocks():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=64, max_model_len=8, max_queued_requests=4)
    runner = FakeRunner(sched)
    seq = make_seq("a", 5, 3)  # 5 + 3 == max_model_len
    sched.add(seq)
    for _ in range(3):
        assert not seq.is_finished
        runner.step()
    assert seq.finish_reason == "length" and len(seq.output_token_ids) == 3
    assert seq.num_tokens == 8 and sched.pool.num_in_use == 0 and not sched.has_work
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
                check_blocks(sched)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert admitted > 20


# ---------------------------------------------------------------------- paged cache policy


def test_a_prompt_sharing_full_blocks_with_a_finished_one_reuses_them():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=64, max_model_len=64,
                      max_queued_requests=4, block_size=4, num_kv_blocks=16)
    runner = FakeRunner(sched)
    first = make_seq("turn1", 10, 3)
    sched.add(first)
    while sched.has_work:
        runner.step()
    blocks = first.block_keys and list(sched.pool.lookup(first.block_keys))
    assert len(blocks) == 3  # 12 tokens computed of 13: three full blocks cached
    # the next turn: the whole earlier conversation, then new tokens
    second = Sequence("turn2", first.all_token_ids + [900, 901, 902], 2)
    sched.add(second)
    out = runner.step()
    assert [(c.start, c.length) for c in out.prefill] == [(12, 4)]
    assert second.block_table[:3] == blocks and second.num_cached_tokens == 12
    assert sched.prefix_hits == 12 and sched.prefix_queries == 10 + 16
    other = make_seq("cold", 10, 2, first=300)
    sched.add(other)
    assert runner.step().prefill[0].start == 0  # nothing shared


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=64, max_model_len=64,
                      max_queued_requests=4, block_size=4, num_kv_blocks=16)
    runner = FakeRunner(sched)
    for rid in ("a", "b"):
        sched.add(make_seq(rid, 8, 1))
        while sched.has_work:
            out = runner.step()
    assert [(c.start, c.length, c.completes_prompt) for c in out.prefill] == [(4, 4, True)]


def test_preempted_sequence_resumes_without_losing_or_repeating_tokens():
    # 6 blocks of 4: two sequences of 4 prompt tokens growing to 16 tokens cannot both fit
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=32, max_model_len=64,
                      max_queued_requests=4, block_size=4, num_kv_blocks=6, watermark=0.0)
    runner = FakeRunner(sched)
    a, b = make_seq("a", 4, 12), make_seq("b", 4, 12, first=100)
    sched.add(a)
    sched.add(b)
    outputs = {"a": [], "b": []}
    preempted = []
    while sched.has_work:
        out = runner.step()
        preempted += [s.request_id for s in out.preempted]
        for seq in (a, b):
            outputs[seq.request_id] = list(seq.output_token_ids)
        check_blocks(sched)
    assert preempted == ["b"] and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert a.finish_reason == b.finish_reason == "length"


def test_recompute_after_preemption_prefills_all_but_the_newest_token():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=32, max_model_len=64,
                      max_queued_requests=4, block_size=4, num_kv_blocks=6, watermark=0.0,
                      enable_prefix_caching=False)
    runner = FakeRunner(sched)
    a, b = make_seq("a", 4, 12), make_seq("b", 4, 12, first=100)
    sched.add(a)
    sched.add(b)
    while not b.num_preemptions:
        runner.step()
    produced = len(b.output_token_ids)
    out = None
    while b.status is not SequenceStatus.RUNNING or b.is_prefilling:
        out = runner.step()
        assert len(b.output_token_ids) == produced  # nothing sampled while recomputing
    chunks = [c for c in out.prefill if c.seq is b]
    assert chunks and not chunks[-1].completes_prompt
    assert b.num_computed_tokens == b.num_tokens - 1
    runner.step()
    assert len(b.output_token_ids) == produced + 1


def test_admission_waits_for_free_blocks_above_the_watermark():
    sched = Scheduler(max_num_seqs=4, max_batched_tokens=64, max_model_len=64,
                      max_queued_requests=4, block_size=4, num_kv_blocks=10, watermark=0.2)
    runner = FakeRunner(sched)
    sched.add(make_seq("a", 23, 4))  # 6 blocks, also for its first output token
    runner.step()
    sched.add(make_seq("b", 8, 4, first=100))  # 2 more would leave 2 = the watermark: ok
    sched.add(make_seq("c", 4, 4, first=200))  # 1 more would leave 1 < 2: waits
    out = runner.step()
    assert [c.seq.request_id for c in out.prefill] == ["b"] and sched.num_waiting == 1


def test_a_request_larger_than_the_whole_pool_is_refused():
    sched = Scheduler(max_num_seqs=2, max_batched_tokens=64, max_model_len=1000,
                      max_queued_requests=4, block_size=16, num_kv_blocks=4)
    with pytest.raises(InvalidRequestError, match="kv_cache_blocks"):
        sched.add(make_seq("x", 60, 10))
