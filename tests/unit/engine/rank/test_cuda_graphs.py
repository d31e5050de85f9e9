"""CUDA graphs for decode steps: bucketing, padding and selection, checked on the CPU.

``eager_replay`` stands in for a captured CUDA graph (it runs the step again over the same
static input buffers), so everything but the capture itself runs here: padded batches write
their padding rows into the spare slot only, padded key lengths change no logits, and the
worker never builds graphs on the CPU. The capture on CUDA is covered by tests/gpu.
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import ModelConfig
from engine.rank.cuda_graphs import (
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    eager_replay,
    kv_buckets,
    use_cuda_graphs,
)
from engine.rank.loader import load_model
from engine.rank.model_runner import ModelRunner


def test_batch_buckets_cover_every_batch_size_up_to_the_maximum():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    for max_batch in (1, 3, 12, 32, 100):
        buckets = batch_buckets(max_batch)
        assert all(bucket_for(b, buckets) >= b for b in range(1, max_batch + 1))
        assert bucket_for(max_batch + 1, buckets) is None


def test_key_length_buckets_are_powers_of_two_up_to_the_context():
    assert kv_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert kv_buckets(300) == [64, 128, 256, 300]
    assert kv_buckets(48, smallest=48) == [48]
    assert bucket_for(65, kv_buckets(2048)) == 128


def test_graphs_are_selected_only_on_cuda_and_only_when_enabled():
    assert not use_cuda_graphs("cpu", True)
    assert not use_cuda_graphs(torch.device("cpu"), True)
    assert not use_cuda_graphs("cuda", False)
    assert use_cuda_graphs("cuda:0", True)


def test_the_worker_builds_no_graphs_on_the_cpu(tiny_checkpoint):
    from engine.rank.worker import TPWorker

    config = ModelConfig(device="cpu", cuda_graphs=True, max_num_seqs=4, max_batched_tokens=64,
                         context_length=128, max_tokens=16)
    worker = TPWorker(config, checkpoint_dir=tiny_checkpoint)
    worker.load()
    assert worker.graphs is None and worker.device.type == "cpu"
    assert worker.runner.num_slots == config.max_num_seqs + config.prefix_cache_slots  # no spare slot


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    config = ModelConfig(device="cpu", context_length=256, max_tokens=16)
    return load_model(config, tiny_checkpoint)


def test_padded_graph_steps_equal_eager_steps(model):
    """Three sequences decode 12 steps: eagerly, and through DecodeGraphs (batch 3 padded to 4,
    key length padded to 64/128) with the spare slot 5; logits and real slots' KV equal."""
    slots, pad_slot, max_len = 5, 5, 256
    eager = ModelRunner(model, num_slots=slots, max_len=max_len)
    graphed = ModelRunner(model, num_slots=slots + 1, max_len=max_len)
    captures = []

    def capture(run, pool):
        captures.append(run)
        return eager_replay(run, pool)

    graphs = DecodeGraphs(
        lambda t, p, s, kv_len: graphed.forward(t, p, s, (), kv_len=kv_len, dense=False),
        max_batch=4, max_len=max_len, pad_slot=pad_slot, device="cpu", capture=capture,
    )
    prompts = [([1, 20, 30, 40, 50], 0, 0), ([1, 60, 70], 0, 1), ([1, 80, 90, 100, 110, 120, 130], 0, 2)]
    first = eager.prefill(prompts)
    assert torch.equal(first, graphed.prefill(prompts))
    tokens = first.argmax(-1).tolist()
    positions = [len(ids) for ids, _, _ in prompts]
    for _ in range(12):
        want = eager.decode(torch.tensor(tokens), torch.tensor(positions), torch.tensor([0, 1, 2]))
        got = graphs.run(tokens, positions, [0, 1, 2])
        assert got is not None and got.shape == want.shape
        # padded shapes may sum in another order: float32 rounding, not a different result
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        tokens = want.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    for layer in range(len(eager.k_cache)):
        end = max(positions)
        torch.testing.assert_close(
            graphed.k_cache[layer][:3, :, :end], eager.k_cache[layer][:3, :, :end], rtol=1e-3, atol=2e-4
        )
        assert not graphed.k_cache[layer][3:5].any()  # padding rows went to the spare slot only
    assert graphs.captured == [(4, 64)] and len(captures) == 1  # one capture, replayed 12 times
    assert graphs.replays == 12


def test_steps_that_fit_no_bucket_fall_back_to_eager(model):
    runner = ModelRunner(model, num_slots=9, max_len=128)
    graphs = DecodeGraphs(
        lambda t, p, s, kv_len: runner.forward(t, p, s, (), kv_len=kv_len, dense=False),
        max_batch=4, max_len=128, pad_slot=8, device="cpu", capture=eager_replay,
    )
    assert graphs.run([1] * 5, list(range(5)), list(range(5))) is None  # batch above 4
    assert graphs.run([1], [128], [0]) is None  # key length above the context
    assert graphs.run([1, 2], [3, 4], [0, 8]) is None  # a sequence in the spare slot
    assert graphs.run([], [], []) is None
    assert graphs.buckets(3, 100) == (4, 128)
