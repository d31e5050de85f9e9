"""What rank 0 sends the other tensor-parallel ranks each engine step.

One fixed-size int64 header, then one int64 payload, both broadcast on the control channel
(``engine.rank.control_channel``: a gloo group of its own, on CPU and CUDA alike; the forward's
all-reduces use the default group, NCCL on CUDA). Every rank then runs the same forward with the same inputs, so
their KV caches stay identical in layout and the split linears' all-reduces line up. This
module is the only place that knows the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OP_STEP = 1
OP_HEARTBEAT = 2  # keeps idle followers' collectives inside their timeout
OP_SHUTDOWN = 3

HEADER_LEN = 8  # op, n_decode, n_chunks, n_prefill_tokens, n_table_entries, reserved x3


@dataclass
class StepPlan:
    """The inputs of one engine step, identical on every rank."""

    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    # each decode sequence's KV block table (engine.scheduling.block_pool): position p is in block
    # table[p // block_size]
    decode_tables: list[list[int]] = field(default_factory=list)
    # (token_ids, start_position, block_table) per prompt chunk
    prefill: list[tuple[list[int], int, list[int]]] = field(default_factory=list)

    @property
    def num_logit_rows(self) -> int:
        return len(self.decode_tokens) + len(self.prefill)


def encode(op: int, plan: StepPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The header and payload tensors for ``op`` (payload empty unless ``op == OP_STEP``)."""
    if op != OP_STEP or plan is None:
        header = torch.tensor([op] + [0] * (HEADER_LEN - 1), dtype=torch.long)
        return header, torch.empty(0, dtype=torch.long)
    values: list[int] = []
    values += plan.decode_tokens
    values += plan.decode_positions
    n_prefill_tokens = 0
    for ids, start, _table in plan.prefill:
        values += (start, len(ids))
        n_prefill_tokens += len(ids)
    for ids, _, _ in plan.prefill:
        values += ids
    tables = plan.decode_tables + [table for _, _, table in plan.prefill]
    values += [len(t) for t in tables]
    n_entries = 0
    for table in tables:
        values += table
        n_entries += len(table)
    header = torch.tensor(
        [op, len(plan.decode_tokens), len(plan.prefill), n_prefill_tokens, n_entries, 0, 0, 0],
        dtype=torch.long,
    )
    return header, torch.tensor(values, dtype=torch.long)


def payload_len(header: torch.Tensor) -> int:
    _, n_decode, n_chunks, n_tokens, n_entries, *_ = header.tolist()
    return 3 * n_decode + 3 * n_chunks + n_tokens + n_entries


def decode(header: torch.Tensor, payload: torch.Tensor) -> tuple[int, StepPlan | None]:
    op, n_decode, n_chunks, *_ = header.tolist()
    if op != OP_STEP:
        return op, None
    v = payload.tolist()
    tokens, positions = v[:n_decode], v[n_decode : 2 * n_decode]
    i = 2 * n_decode
    metas = [v[i + 2 * j : i + 2 * j + 2] for j in range(n_chunks)]
    i += 2 * n_chunks
    chunk_ids = []
    for _, length in metas:
        chunk_ids.append(v[i : i + length])
        i += length
    lengths = v[i : i + n_decode + n_chunks]
    i += n_decode + n_chunks
    tables = []
    for n in lengths:
        tables.append(v[i : i + n])
        i += n
    prefill = [(ids, start, table) for ids, (start, _), table in zip(chunk_ids, metas, tables[n_decode:])]
    return op, StepPlan(
        decode_tokens=tokens, decode_positions=positions, decode_tables=tables[:n_decode], prefill=prefill,
    )
