"""What rank 0 sends the other tensor-parallel ranks each engine step.

One fixed-size int64 header, then one int64 payload, both broadcast on the control channel
(``engine.rank.control_channel``: a gloo group of its own, on CPU and CUDA alike; the forward's
all-reduces use the default group, NCCL on CUDA). Every rank then runs the same forward with the same inputs, so
their KV caches stay identical in layout and the sharded linears' all-reduces line up. This
module is the only place that knows the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OP_STEP = 1
OP_HEARTBEAT = 2  # keeps idle followers' collectives inside their timeout
OP_SHUTDOWN = 3

HEADER_LEN = 8  # op, n_moves, n_decode, n_chunks, n_prefill_tokens, n_saves, n_loads, reserved


@dataclass
class StepPlan:
    """The inputs of one engine step, identical on every rank."""

    # prefix cache: (src_slot, dst_slot, tokens) copies; saves run before the slot moves
    # (they read slots of sequences that just finished), loads after them (they fill the
    # slots of sequences admitted in this step)
    kv_saves: list[tuple[int, int, int]] = field(default_factory=list)
    slot_moves: list[tuple[int, int]] = field(default_factory=list)
    kv_loads: list[tuple[int, int, int]] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    # (token_ids, start_position, slot) per prompt chunk
    prefill: list[tuple[list[int], int, int]] = field(default_factory=list)

    @property
    def num_logit_rows(self) -> int:
        return len(self.decode_tokens) + len(self.prefill)


def encode(op: int, plan: StepPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The header and payload tensors for ``op`` (payload empty unless ``op == OP_STEP``)."""
    if op != OP_STEP or plan is None:
        header = torch.tensor([op] + [0] * (HEADER_LEN - 1), dtype=torch.long)
        return header, torch.empty(0, dtype=torch.long)
    values: list[int] = []
    for src, dst in plan.slot_moves:
        values += (src, dst)
    values += plan.decode_tokens
    values += plan.decode_positions
    values += plan.decode_slots
    n_prefill_tokens = 0
    for ids, start, slot in plan.prefill:
        values += (start, slot, len(ids))
        n_prefill_tokens += len(ids)
    for ids, _, _ in plan.prefill:
        values += ids
    for copy in plan.kv_saves + plan.kv_loads:
        values += copy
    header = torch.tensor(
        [op, len(plan.slot_moves), len(plan.decode_tokens), len(plan.prefill), n_prefill_tokens,
         len(plan.kv_saves), len(plan.kv_loads), 0],
        dtype=torch.long,
    )
    return header, torch.tensor(values, dtype=torch.long)


def payload_len(header: torch.Tensor) -> int:
    _, n_moves, n_decode, n_chunks, n_tokens, n_saves, n_loads, _ = header.tolist()
    return 2 * n_moves + 3 * n_decode + 3 * n_chunks + n_tokens + 3 * (n_saves + n_loads)


def decode(header: torch.Tensor, payload: torch.Tensor) -> tuple[int, StepPlan | None]:
    op, n_moves, n_decode, n_chunks, _, n_saves, n_loads, _ = header.tolist()
    if op != OP_STEP:
        return op, None
    v = payload.tolist()
    i = 0
    moves = [(v[i + 2 * j], v[i + 2 * j + 1]) for j in range(n_moves)]
    i += 2 * n_moves
    tokens, positions, slots = v[i : i + n_decode], v[i + n_decode : i + 2 * n_decode], v[i + 2 * n_decode : i + 3 * n_decode]
    i += 3 * n_decode
    metas = [v[i + 3 * j : i + 3 * j + 3] for j in range(n_chunks)]
    i += 3 * n_chunks
    prefill = []
    for start, slot, length in metas:
        prefill.append((v[i : i + length], start, slot))
        i += length
    copies = [tuple(v[i + 3 * j : i + 3 * j + 3]) for j in range(n_saves + n_loads)]
    return op, StepPlan(
        kv_saves=copies[:n_saves], slot_moves=moves, kv_loads=copies[n_saves:],
        decode_tokens=tokens, decode_positions=positions, decode_slots=slots, prefill=prefill,
    )
