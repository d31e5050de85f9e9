"""CUDA graphs for decode-only steps: one graph per (batch bucket, key-length bucket).

A decode step of a 70B layer stack launches ~30 kernels and 2 all-reduces per layer; at small
batches the GPU waits on the CPU launching them. A CUDA graph records the launches once and
replays them with one call. A graph replays fixed shapes at fixed addresses, so:

- **static inputs**: per batch bucket, ``tokens``, ``positions`` and ``slots`` tensors on the
  device; a step copies its values into the first B rows and pads the rest (token 0 at
  position 0 of ``pad_slot``, a KV slot no sequence uses: the padded rows' keys and values
  land there and nowhere else);
- **buckets**: the step's batch is rounded up to a batch bucket (1, 2, 4, 8, then multiples
  of 8) and its key length (``max(positions) + 1``) up to a key-length bucket (powers of two
  from 64 to the context length); the runner's attention masks keys past each row's
  position, so the padding changes no row's result;
- the step function must not synchronise with the host or depend on input values for its
  shapes: ``ModelRunner.forward`` with ``kv_len`` and ``dense=False`` given does neither.

Graphs are captured on first use of a bucket pair (after one eager warm-up run, as CUDA
requires), share one memory pool, and are only used where ``use_cuda_graphs`` says so: on
CUDA with ``cuda_graphs`` on. On the CPU the same wrapper is never built; its bucketing and
padding are tested there with ``capture=eager_replay`` standing in for a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (tokens, positions, slots, kv_len) -> logits [B, vocab]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor], object], Replay]


def use_cuda_graphs(device: torch.device | str, enabled: bool) -> bool:
    """Whether decode steps run as CUDA graphs: only on a CUDA device, only when enabled."""
    return bool(enabled) and torch.device(device).type == "cuda"


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (which is always included)."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


def kv_buckets(max_len: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` below ``max_len``, then ``max_len``."""
    sizes, n = [], smallest
    while n < max_len:
        sizes.append(n)
        n *= 2
    return sizes + [max_len]


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n`` (None when ``n`` is above the largest)."""
    for b in buckets:
        if n <= b:
            return b
    return None


def cuda_capture(run: Callable[[], torch.Tensor], pool) -> Replay:
    """Record ``run`` as a CUDA graph (after one warm-up on a side stream, as CUDA requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def eager_replay(run: Callable[[], torch.Tensor], pool) -> Replay:
    """A stand-in for ``cuda_capture`` that runs ``run`` again at each replay (CPU tests)."""
    return run


class DecodeGraphs:
    """A decode-step callable, replayed from graphs captured per bucket pair."""

    def __init__(
        self,
        step: StepFn,
        *,
        max_batch: int,
        max_len: int,
        pad_slot: int,
        device: torch.device | str,
        capture: Capture = cuda_capture,
        min_kv_bucket: int = 64,
    ) -> None:
        self.step = step
        self.batch_buckets = batch_buckets(max_batch)
        self.kv_buckets = kv_buckets(max_len, min(min_kv_bucket, max_len))
        self.pad_slot = pad_slot
        self.device = torch.device(device)
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[tuple[int, int], Replay] = {}
        self.replays = 0

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def buckets(self, batch: int, kv_len: int) -> tuple[int, int] | None:
        """The (batch, key length) bucket pair of a step, None when it fits no graph."""
        b, k = bucket_for(batch, self.batch_buckets), bucket_for(kv_len, self.kv_buckets)
        return None if b is None or k is None else (b, k)

    def run(
        self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor | None:
        """Logits ``[B, vocab]`` of one decode step from a graph; None when the step fits no
        bucket (the caller then runs it eagerly). The result is a view of the graph's output:
        read it before the next step."""
        batch = len(tokens)
        if batch == 0 or self.pad_slot in slots:
            return None
        pair = self.buckets(batch, max(positions) + 1)
        if pair is None:
            return None
        bb, kb = pair
        static = self._static_inputs(bb)
        pad = bb - batch
        values = torch.tensor(
            [list(tokens) + [0] * pad, list(positions) + [0] * pad, list(slots) + [self.pad_slot] * pad],
            dtype=torch.long,
        )
        for dst, src in zip(static, values):
            dst.copy_(src, non_blocking=True)
        replay = self._graphs.get(pair)
        if replay is None:
            replay = self._graphs[pair] = self.capture(lambda: self.step(*static, kb), self.pool)
        out = replay()
        self.replays += 1
        return out[:batch]

    def _static_inputs(self, bb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if bb not in self._inputs:
            self._inputs[bb] = tuple(
                torch.zeros(bb, dtype=torch.long, device=self.device) for _ in range(3)
            )
        return self._inputs[bb]


__all__ = [
    "DecodeGraphs", "batch_buckets", "kv_buckets", "bucket_for", "use_cuda_graphs",
    "cuda_capture", "eager_replay",
]
