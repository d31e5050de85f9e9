"""Device planning: which precision, how many ranks, how many replicas, how much KV cache.

Pure functions over the catalog's sizes (no torch at import). ``plan_deployment`` takes the
machine and what is wanted (model, dtype or quantization, context, batch) and returns a
``DevicePlan``, or raises ``ConfigError`` explaining what is missing and what would fit.

Order of choices, cheapest in quality first: the requested precision on the fewest ranks
that hold the whole batch; then the same precision with a smaller batch (throughput, not
quality, is what shrinks); only when the weights themselves do not fit, 8-bit then 4-bit
weights (bitsandbytes; one rank). Every fallback is logged and listed in the plan.

Memory model per rank (conservative; documented in docs/models.md):
  GPU: gpu_memory * GPU_MEMORY_UTILIZATION >= weights/tp + KV cache + CUDA_RESERVE + activations
  CPU: ram * CPU_MEMORY_UTILIZATION >= weights + KV cache + tp * (CPU_PROCESS_RESERVE + activations)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from cluster.catalog import DTYPE_BYTES, GIB, LlamaArchitecture, ModelSpec, model_spec
from cluster.errors import ConfigError
from cluster.logging_setup import get_logger

log = get_logger("cluster.planner")

GPU_MEMORY_UTILIZATION = 0.90  # the rest is left to the allocator's fragmentation and NCCL
CUDA_RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspace
MAX_POOL_SEQUENCES = 4  # the KV pool holds at most this many full contexts per running slot
CPU_MEMORY_UTILIZATION = 0.80  # the OS, Ray's own processes, the page cache of the weights
CPU_PROCESS_RESERVE_BYTES = GIB // 2  # Python, torch and DeepSpeed in each rank process
MAX_CPU_TP = 8  # beyond this the gloo all-reduce per layer dominates a decode step
GPU_SIZES_GIB = (16, 24, 40, 48, 80, 94, 141)  # common cards, for "a GPU of >= N GiB" hints


@dataclass(frozen=True)
class Machine:
    """What one deployment may use: ``nodes`` alike, each with GPUs or only CPUs."""

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gib: float = 0.0
    cpu_memory_gib: float = 16.0
    cpu_cores: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpu_cores < 1:
            raise ConfigError(
                f"machine nodes={self.nodes}, gpus_per_node={self.gpus_per_node}, cpu_cores={self.cpu_cores}: "
                "need nodes >= 1, gpus_per_node >= 0 and cpu_cores >= 1",
                param="machine",
            )
        if self.gpus_per_node and self.gpu_memory_gib <= 0:
            raise ConfigError(
                f"machine gpu_memory_gib={self.gpu_memory_gib} with {self.gpus_per_node} GPUs; give the memory of one GPU",
                param="machine",
            )

    @property
    def has_gpus(self) -> bool:
        return self.gpus_per_node > 0

    def describe(self) -> str:
        nodes = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        if self.has_gpus:
            unit = "GPU" if self.gpus_per_node == 1 else "GPUs"
            return f"{nodes}{self.gpus_per_node} x {_num(self.gpu_memory_gib)} GiB {unit}"
        return f"{nodes}CPU only ({_num(self.cpu_memory_gib)} GiB, {self.cpu_cores} cores)"

    @classmethod
    def parse(cls, spec: str) -> Machine:
        """``1x24``, ``8x80``, ``2x8x80`` (nodes x GPUs x GiB), ``cpu`` or ``cpu:64:16`` (GiB:cores)."""
        text = spec.strip().lower().replace(" ", "")
        if m := re.fullmatch(r"cpu(?::(\d+(?:\.\d+)?))?(?::(\d+))?", text):
            return cls(cpu_memory_gib=float(m[1] or 16), cpu_cores=int(m[2] or 1))
        if m := re.fullmatch(r"(?:(\d+)x)?(\d+)x(\d+(?:\.\d+)?)(?:gib|g)?", text):
            return cls(nodes=int(m[1] or 1), gpus_per_node=int(m[2]), gpu_memory_gib=float(m[3]))
        raise ConfigError(
            f"machine={spec!r} is not understood; use e.g. 1x24 (one 24 GiB GPU), 8x80, 2x8x80 "
            "(two nodes of 8 x 80 GiB), cpu or cpu:64:16 (64 GiB RAM, 16 cores)",
            param="machine",
        )


@dataclass(frozen=True)
class PlanRequest:
    """What should be served: the model, its precision and the batch it should carry."""

    model_size: str
    model_variant: str = "chat"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str | None = None  # None | 8bit | 4bit
    context_length: int = 4096
    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    kv_block_size: int = 16
    allow_fallback: bool = True  # bfloat16 on CPU, a smaller batch, then 8-bit/4-bit weights


@dataclass(frozen=True)
class DevicePlan:
    """A feasible placement of one model on a machine."""

    model: str
    machine: Machine
    device: str
    dtype: str
    quantization: str | None
    tp_size: int
    replicas_per_node: int
    context_length: int
    max_num_seqs: int
    max_batched_tokens: int
    cpu_threads_per_rank: int
    weight_bytes_per_rank: int
    kv_bytes_per_token_per_rank: int
    kv_budget_bytes_per_rank: int
    reserved_bytes_per_rank: int
    usable_bytes_per_rank: int
    fallbacks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    kv_block_size: int = 16

    @property
    def kv_cache_blocks(self) -> int:
        """Blocks of the paged KV pool per rank: the KV budget, capped at 4 x max_num_seqs
        full-length sequences (the rest of the prefix cache would rarely be hit)."""
        budget = self.kv_budget_bytes_per_rank // (self.kv_bytes_per_token_per_rank * self.kv_block_size)
        cap = MAX_POOL_SEQUENCES * self.max_num_seqs * -(-self.context_length // self.kv_block_size)
        return max(1, min(budget, cap))

    @property
    def replicas(self) -> int:
        return self.replicas_per_node * self.machine.nodes

    @property
    def kv_tokens_per_replica(self) -> int:
        return self.kv_budget_bytes_per_rank // self.kv_bytes_per_token_per_rank

    def model_config_fields(self) -> dict:
        """The ``ModelConfig`` fields this plan decides (device placement follows them)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "tp_size": self.tp_size,
            "cpu_threads_per_rank": self.cpu_threads_per_rank,
            "context_length": self.context_length,
            "max_num_seqs": self.max_num_seqs,
            "max_batched_tokens": max(self.max_batched_tokens, self.max_num_seqs),
            "kv_block_size": self.kv_block_size,
            "kv_cache_blocks": self.kv_cache_blocks,
        }


# -- memory arithmetic ----------------------------------------------------------------------


def rank_weight_bytes(arch: LlamaArchitecture, dtype: str, quantization: str | None, tp_size: int) -> int:
    """Weights on one rank: AutoTP splits the projections and lm_head, replicates the rest."""
    if quantization is not None:
        return arch.weight_bytes(dtype, quantization)
    counts = arch.parameter_counts()
    split = counts.linear + counts.lm_head
    return (math.ceil(split / tp_size) + counts.embedding + counts.norms) * DTYPE_BYTES[dtype]


def activation_bytes(arch: LlamaArchitecture, req: PlanRequest, dtype: str, tp_size: int) -> int:
    """Peak working memory of one engine step on one rank (a prefill of max_batched_tokens).

    Hidden states and projections of the step's tokens, attention scores as if materialised
    (the CPU's SDPA does), and the fp32 logits of the batch.
    """
    tokens = req.max_batched_tokens
    act = DTYPE_BYTES[dtype]
    kv_dim = arch.num_key_value_heads * arch.head_dim
    dense = tokens * (4 * arch.hidden_size + (2 * kv_dim + 2 * arch.intermediate_size) // tp_size) * act
    scores = (arch.num_attention_heads // tp_size) * tokens * req.context_length * 4
    logits = req.max_num_seqs * arch.vocab_size * 4
    return dense + scores + logits


@dataclass(frozen=True)
class _Fit:
    dtype: str
    quantization: str | None
    tp_size: int
    weights: int
    kv_per_token: int
    reserved: int
    usable: int
    kv_budget: int
    context_length: int

    @property
    def max_seqs(self) -> int:
        """Sequences of the full context the KV budget holds (0 when the weights do not fit)."""
        return max(0, self.kv_budget // (self.kv_per_token * self.context_length))


def _fit(arch: LlamaArchitecture, machine: Machine, req: PlanRequest, dtype: str, quant: str | None, tp: int) -> _Fit:
    weights = rank_weight_bytes(arch, dtype, quant, tp)
    act = activation_bytes(arch, req, dtype, tp)
    if machine.has_gpus:
        usable = int(machine.gpu_memory_gib * GIB * GPU_MEMORY_UTILIZATION)
        reserved = CUDA_RESERVE_BYTES + act
        kv_per_token = arch.kv_cache_bytes_per_token(dtype) // tp
        budget = usable - weights - reserved
    else:
        # One host holds every rank: weights and KV cache add up over the ranks.
        usable = int(machine.cpu_memory_gib * GIB * CPU_MEMORY_UTILIZATION)
        reserved = tp * (CPU_PROCESS_RESERVE_BYTES + act)
        kv_per_token = arch.kv_cache_bytes_per_token(dtype)
        budget = usable - weights * tp - reserved
    return _Fit(dtype, quant, tp, weights, kv_per_token, reserved, usable, budget, req.context_length)


# -- choosing ---------------------------------------------------------------------------------


def _precisions(req: PlanRequest, machine: Machine) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(requested precisions, quantized fallbacks), each as (dtype, quantization)."""
    gpu = machine.has_gpus
    if req.dtype == "float16" and not gpu:
        raise ConfigError("dtype='float16' on a CPU-only machine: CPUs run float32 or bfloat16; set dtype", param="dtype")
    if req.dtype not in ("auto", *DTYPE_BYTES):
        raise ConfigError(f"dtype={req.dtype!r} is unknown; use auto, {', '.join(DTYPE_BYTES)}", param="dtype")
    if req.quantization not in (None, "8bit", "4bit"):
        raise ConfigError(f"quantization={req.quantization!r} is unknown; use 8bit, 4bit or none", param="quantization")
    dtype = req.dtype if req.dtype != "auto" else ("float16" if gpu else "float32")
    wanted = [(dtype, req.quantization)]
    if req.dtype == "auto" and not gpu and req.quantization is None and req.allow_fallback:
        wanted.append(("bfloat16", None))  # half the memory at the same speed on modern CPUs
    compute = "bfloat16" if not gpu and req.dtype == "auto" else dtype
    order = {None: 0, "8bit": 1, "4bit": 2}
    fallbacks = [(compute, q) for q in ("8bit", "4bit") if order[q] > order[req.quantization]]
    return wanted, (fallbacks if req.allow_fallback else [])


def _tp_sizes(arch: LlamaArchitecture, machine: Machine, quant: str | None) -> list[int]:
    if quant is not None:
        return [1]  # bitsandbytes weights are not split by AutoTP
    if machine.has_gpus:
        return arch.valid_tp_sizes(machine.gpus_per_node)
    # On the CPU more ranks add compute, not memory: use the cores (one thread per rank).
    return [max(arch.valid_tp_sizes(min(machine.cpu_cores, MAX_CPU_TP)))]


def plan_deployment(machine: Machine, req: PlanRequest) -> DevicePlan:
    """The plan for ``req`` on ``machine``, or ``ConfigError`` saying what is missing."""
    spec = model_spec(req.model_size, req.model_variant)
    arch = spec.architecture
    if req.context_length > arch.max_position_embeddings:
        raise ConfigError(
            f"context_length={req.context_length} is above the {arch.max_position_embeddings} tokens "
            f"{arch.name} was trained for; set context_length <= {arch.max_position_embeddings}",
            param="context_length",
        )
    wanted, quantized = _precisions(req, machine)
    fits = [_fit(arch, machine, req, d, q, tp) for d, q in wanted for tp in _tp_sizes(arch, machine, q)]
    fallback_fits = [_fit(arch, machine, req, d, q, 1) for d, q in quantized]
    fallbacks: list[str] = []
    chosen = next((f for f in fits if f.max_seqs >= req.max_num_seqs), None)
    if chosen is None and any(f.max_seqs >= 1 for f in fits):
        best = max(fits, key=lambda f: (f.max_seqs, -f.tp_size))
        if not req.allow_fallback:
            raise ConfigError(
                f"{spec.name} in {_precision(best.dtype, best.quantization)} on {machine.describe()} with "
                f"tp_size={best.tp_size}: the KV cache holds {_seqs(best.max_seqs)} of {req.context_length} "
                f"tokens, not {req.max_num_seqs}; use max_num_seqs <= {best.max_seqs}, a shorter context, "
                "more GPUs, or allow the planner to fall back (allow_fallback=True)",
                param="max_num_seqs",
            )
        chosen = best
    if chosen is None:
        chosen = next((f for f in fallback_fits if f.max_seqs >= req.max_num_seqs), None)
        chosen = chosen or next((f for f in fallback_fits if f.max_seqs >= 1), None)
        if chosen is None:
            raise ConfigError(_explain_no_fit(spec, machine, req, wanted), param="quantization")
        fallbacks.append(
            f"{_precision(*wanted[0])} weights ({_gib(arch.weight_bytes(*wanted[0]))}) do not fit "
            f"{machine.describe()}: quantized to {chosen.quantization} ({_gib(chosen.weights)})"
        )
    if chosen.dtype != wanted[0][0] and chosen.quantization is None:
        fallbacks.append(f"{wanted[0][0]} does not fit {machine.describe()}: using {chosen.dtype}")
    seqs = min(req.max_num_seqs, chosen.max_seqs)
    if seqs < req.max_num_seqs:
        fallbacks.append(
            f"KV cache holds {_seqs(seqs)} of {req.context_length} tokens, not {req.max_num_seqs}: "
            f"max_num_seqs lowered to {seqs}"
        )
    notes = _hints(fits + fallback_fits, chosen, req)
    for text in fallbacks:
        log.warning("plan fallback: %s", text, extra={"model": spec.name, "machine": machine.describe()})
    gpu = machine.has_gpus
    return DevicePlan(
        model=spec.name,
        machine=machine,
        device="cuda" if gpu else "cpu",
        dtype=chosen.dtype,
        quantization=chosen.quantization,
        tp_size=chosen.tp_size,
        replicas_per_node=machine.gpus_per_node // chosen.tp_size if gpu else 1,
        context_length=req.context_length,
        max_num_seqs=seqs,
        max_batched_tokens=req.max_batched_tokens,
        cpu_threads_per_rank=1 if gpu or chosen.tp_size > 1 else machine.cpu_cores,
        weight_bytes_per_rank=chosen.weights,
        kv_bytes_per_token_per_rank=chosen.kv_per_token,
        kv_budget_bytes_per_rank=chosen.kv_budget,
        reserved_bytes_per_rank=chosen.reserved if gpu else chosen.reserved // chosen.tp_size,
        usable_bytes_per_rank=chosen.usable,
        fallbacks=tuple(fallbacks),
        notes=tuple(notes),
        kv_block_size=req.kv_block_size,
    )


def _hints(candidates: list[_Fit], chosen: _Fit, req: PlanRequest) -> list[str]:
    """What another choice would give, when the chosen one had to give something up."""
    if chosen.max_seqs >= req.max_num_seqs:
        return []
    better = [f for f in candidates if f.max_seqs > chosen.max_seqs and f is not chosen]
    return [
        f"{_precision(f.dtype, f.quantization)} with tp_size={f.tp_size} would hold "
        f"{_seqs(min(f.max_seqs, req.max_num_seqs))}"
        for f in better[:2]
    ]


def _explain_no_fit(spec: ModelSpec, machine: Machine, req: PlanRequest, wanted) -> str:
    arch = spec.architecture
    dtype, quant = wanted[0]
    need = arch.weight_bytes(dtype, quant)
    what = f"{spec.name} in {_precision(dtype, quant)} needs {_gib(need)} of weights"
    if machine.has_gpus:
        total = machine.gpus_per_node * machine.gpu_memory_gib
        per_node = f" ({_num(total)} GiB per node)" if machine.gpus_per_node > 1 else ""
        room = f"{machine.describe()}{per_node} cannot hold it"
    else:
        room = f"{machine.describe()} cannot hold it"
    parts = [what, room]
    qdtype = "bfloat16" if not machine.has_gpus and dtype == "float32" else dtype
    qsizes = [f"{q[0]}-bit needs {_gib(arch.weight_bytes(qdtype, q))}" for q in ("8bit", "4bit") if q != quant]
    fixes: list[str] = []
    if machine.has_gpus:
        gpus = _gpus_needed(arch, machine, req, dtype, quant)
        if gpus:
            fixes.append(f"{gpus} GPUs of {_num(machine.gpu_memory_gib)} GiB (tp_size={gpus})")
        if qsizes:
            one = f"one {_num(machine.gpu_memory_gib)} GiB GPU holds {_gib(_fit(arch, machine, req, qdtype, None, 1).usable)}"
            parts.append(" and ".join(qsizes) + f" on one GPU (quantized weights are not split); {one}")
        sizes = {q: _gpu_size_needed(arch, machine, req, qdtype, q) for q in ("8bit", "4bit") if q != quant}
        fitting = [q for q, size in sizes.items() if size and size <= machine.gpu_memory_gib]
        if fitting:
            fixes.insert(0, f"quantization={fitting[0]}")
        elif any(sizes.values()):
            q, size = min(((q, s) for q, s in sizes.items() if s), key=lambda item: item[1])
            fixes.append(f"quantization={q} on a GPU of >= {size} GiB")
    else:
        if qsizes:
            parts.append(" and ".join(qsizes))
        ram = _ram_needed(arch, machine, req)
        fixes.append(f"a machine with >= {ram} GiB of RAM for 4-bit, or GPUs")
    if not req.allow_fallback:
        fixes.append("allow the planner to fall back (allow_fallback=True)")
    return "; ".join(parts) + "; use " + " or ".join(dict.fromkeys(fixes))


def _gpus_needed(arch, machine: Machine, req: PlanRequest, dtype: str, quant: str | None) -> int | None:
    if quant is not None:
        return None
    for tp in arch.valid_tp_sizes():
        wider = replace(machine, gpus_per_node=tp)
        if tp > machine.gpus_per_node and _fit(arch, wider, req, dtype, None, tp).max_seqs >= 1:
            return tp
    return None


def _gpu_size_needed(arch, machine: Machine, req: PlanRequest, dtype: str, quant: str) -> int | None:
    for size in GPU_SIZES_GIB:
        bigger = replace(machine, gpus_per_node=1, gpu_memory_gib=size)
        if _fit(arch, bigger, req, dtype, quant, 1).max_seqs >= 1:
            return size
    return None


def _ram_needed(arch, machine: Machine, req: PlanRequest) -> int:
    size = 8
    while _fit(arch, replace(machine, cpu_memory_gib=size), req, "bfloat16", "4bit", 1).max_seqs < 1:
        size *= 2
    return size


# -- presentation ---------------------------------------------------------------------------


def _seqs(n: int) -> str:
    return f"{n} sequence" if n == 1 else f"{n} sequences"


def _num(value: float) -> str:
    return f"{value:g}"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _precision(dtype: str, quantization: str | None) -> str:
    return dtype if quantization is None else f"{quantization} ({dtype} compute)"


def render_plan(plan: DevicePlan) -> str:
    """The plan as a two-column text table (what ``m-ai plan`` prints)."""
    rows = [
        ("model", plan.model),
        ("machine", plan.machine.describe()),
        ("device", plan.device),
        ("precision", _precision(plan.dtype, plan.quantization)),
        ("tp_size", str(plan.tp_size)),
        ("replicas", f"{plan.replicas} ({plan.replicas_per_node} per node)"),
        ("weights per rank", _gib(plan.weight_bytes_per_rank)),
        ("KV cache per rank" if plan.device == "cuda" else "KV cache (host)", _gib(plan.kv_budget_bytes_per_rank)),
        ("KV tokens per replica", f"{plan.kv_tokens_per_replica:,}"),
        ("KV cache blocks", f"{plan.kv_cache_blocks:,} of {plan.kv_block_size} tokens"),
        ("max_num_seqs", str(plan.max_num_seqs)),
        ("context_length", str(plan.context_length)),
        ("reserved per rank", _gib(plan.reserved_bytes_per_rank)),
        ("usable memory", _gib(plan.usable_bytes_per_rank) + (" per GPU" if plan.device == "cuda" else " (host)")),
    ]
    rows += [("fallback", text) for text in plan.fallbacks]
    rows += [("note", text) for text in plan.notes]
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = f"+-{'-' * width}-+-{'-' * value_width}-+"
    lines = [rule] + [f"| {k.ljust(width)} | {v.ljust(value_width)} |" for k, v in rows] + [rule]
    return "\n".join(lines)


def plan_for_config(config, machine: Machine | None = None) -> DevicePlan:
    """The plan for a ``ModelConfig`` on ``machine`` (default: this host)."""
    return plan_deployment(machine or local_machine(), PlanRequest(
        model_size=config.model_size, model_variant=config.model_variant, dtype=config.dtype,
        quantization=config.quantization, context_length=config.context_length,
        max_num_seqs=config.max_num_seqs, max_batched_tokens=config.max_batched_tokens,
        kv_block_size=config.kv_block_size,
    ))


def apply_plan(config, plan: DevicePlan):
    """``config`` placed as ``plan`` says (device, dtype, quantization, ranks, batch), validated."""
    from cluster.config import build_model_config

    return build_model_config(**{**config.model_dump(), **plan.model_config_fields()})


def local_machine() -> Machine:
    """This host as a ``Machine`` (GPUs through torch when it is installed)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_gib = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GIB if count else 0.0
    except ImportError:
        count, gpu_gib = 0, 0.0
    return Machine(gpus_per_node=count, gpu_memory_gib=round(gpu_gib, 1), cpu_memory_gib=round(ram, 1), cpu_cores=cores)


__all__ = [
    "Machine",
    "PlanRequest",
    "DevicePlan",
    "plan_deployment",
    "render_plan",
    "local_machine",
    "plan_for_config",
    "apply_plan",
    "rank_weight_bytes",
    "activation_bytes",
]
