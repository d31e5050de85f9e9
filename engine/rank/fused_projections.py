"""One decoder layer's projections as few, wide matmuls: q/k/v as one, gate/up as one.

At batch 32 on the tiny model a decode step is dominated by per-call overhead, not FLOPs, so
three q/k/v matmuls and two gate/up matmuls per layer cost more than one of each. The fused
weight is the concatenation of *this rank's* modules' weights: with DeepSpeed AutoTP each
rank holds column slices of q, k, v, gate and up, and concatenating its own slices gives its
own slice of every output, so tensor parallelism is unchanged (o_proj and down_proj, the
row-parallel layers that all-reduce, are still called as modules). The modules keep working
on views of the fused tensor: the weights are not held twice.

Modules that are not plain linears (bitsandbytes' quantized ones, anything with hooks) are
called one by one and their outputs concatenated: slower, same results.

Every element is computed with Hugging Face's own arithmetic (``rms_norm``, rotary, SiLU), so
greedy decoding stays token for token equal to ``generate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cluster.errors import MAIError

Projection = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; for Llama's RMSNorm in float32, torch's one-call kernel (bitwise the same
    arithmetic: float32 mean of squares, rsqrt, then the weight) without a module call."""
    if x.dtype is torch.float32 and type(norm).__name__ == "LlamaRMSNorm":
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


class LayerProjections:
    """The projections of one decoder layer, in the layout the runner attends with."""

    def __init__(
        self,
        qkv: Projection,
        o: Projection,
        gate_up: Projection,
        down: Projection,
        act: Projection,
        *,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
    ) -> None:
        self.qkv, self.o, self.gate_up, self.down, self.act = qkv, o, gate_up, down, act
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads

    def qkv_heads(
        self, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated keys and values of ``h [B, T, hidden]``, ``[B, T, heads, hd]``.

        Rotary runs once over queries and keys together: ``x * cos + rotate_half(x) * sin``
        with ``rotate_half(x) * sin == roll(x, hd/2) * signed_sin`` (``signed_sin`` has its
        first half negated), element for element the same products and sum as Hugging Face's.
        """
        b, t = h.shape[0], h.shape[1]
        nq, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(h).view(b, t, nq + 2 * nkv, hd)
        qk = qkv[:, :, : nq + nkv]
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * signed_sin
        return qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv :]

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """``down(act(gate(h)) * up(h))``, Llama's MLP."""
        gate_up = self.gate_up(h)
        half = gate_up.shape[-1] // 2
        return self.down(self.act(gate_up[..., :half]) * gate_up[..., half:])


def build_projections(
    layer: torch.nn.Module, head_dim: int, num_heads: int, num_kv_heads: int
) -> LayerProjections:
    """This rank's projections of a Llama decoder layer (fused where the modules allow it)."""
    attn, mlp = layer.self_attn, layer.mlp
    with torch.inference_mode(False), torch.no_grad():  # fused weights are ordinary tensors
        qkv = _fused((attn.q_proj, attn.k_proj, attn.v_proj))
        gate_up = _fused((mlp.gate_proj, mlp.up_proj))
    projections = LayerProjections(
        qkv, direct(attn.o_proj), gate_up, direct(mlp.down_proj), _activation(mlp.act_fn),
        head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
    )
    width = getattr(qkv, "out_features", None)
    if width is not None and width != (num_heads + 2 * num_kv_heads) * head_dim:
        raise MAIError(
            f"q/k/v give {width} features on this rank, expected ({num_heads} + 2 x "
            f"{num_kv_heads}) heads x {head_dim}; the model's head counts must divide by tp_size",
            param="tp_size",
        )
    return projections


class _FusedLinear:
    """``x @ weight.T (+ bias)`` over the concatenated weights of several linears."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _PackedLinear:
    """``x @ weight.T (+ bias)`` through oneDNN with the weight reordered once into its blocked
    layout (CPU, float32 or bfloat16). ``F.linear`` there goes to MKL's sgemm, which packs the
    weight again on every call: for the 32-row products of a decode step oneDNN's prepacked
    kernel measured 10-17% less CPU on the tiny model's shapes and ~30% less on the small
    one's. The sums are ordered differently: results differ from ``F.linear`` by float
    rounding (~2e-6 on activations of ~1)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            flat = torch.cat((flat, flat.new_zeros(padded - rows, flat.shape[1])))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        if padded != rows:
            out = out[:rows]
        return out.view(*x.shape[:-1], self.out_features)


def padded_rows(rows: int) -> int:
    """The row count a packed linear runs ``rows`` rows as: itself up to a decode batch's 32,
    above that rounded up to one of 8 steps per power of two (33 -> 36, 1000 -> 1024).

    oneDNN builds (JIT-compiles) a kernel per input shape and keeps up to 1,024 of them, each
    0.6-0.9 MiB here: a rank whose mixed prefill-and-decode steps have any row count would
    grow by hundreds of MiB before the cache is full. With these steps a linear has at most
    32 + 8 per doubling of shapes (80 up to 2,048 rows), all seen early; the zero rows cost
    at most an eighth more of a prefill step's matmul, about 6% on average."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def packing_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can go through ``_PackedLinear``: a CPU float32/bfloat16 matrix where
    torch has oneDNN (``M_AI_CPU_LINEAR=torch`` keeps torch's own ``F.linear``)."""
    return (
        os.environ.get("M_AI_CPU_LINEAR", "onednn") != "torch"
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Projection:
    if packing_available(weight):
        try:
            return _PackedLinear(weight, bias)
        except RuntimeError:  # a torch build whose oneDNN lacks the op: torch's own path
            pass
    return _FusedLinear(weight, bias)


def _fused(modules: Sequence[torch.nn.Module]) -> Projection:
    """One matmul for ``modules`` when they are all plain linears; else their outputs concatenated."""
    biased = [getattr(m, "bias", None) is not None for m in modules]
    if (
        not all(_plain_linear(m) for m in modules)
        or len({(m.weight.dtype, m.weight.device) for m in modules}) != 1
        or any(biased) != all(biased)
    ):
        return lambda x: torch.cat([m(x) for m in modules], dim=-1)
    weight = torch.cat([m.weight for m in modules])
    bias = torch.cat([m.bias for m in modules]) if all(biased) else None
    # The modules now read views of the fused tensors, so the old weights can be freed.
    start = 0
    for m in modules:
        end = start + m.weight.shape[0]
        m.weight.data = weight[start:end]
        if bias is not None:
            m.bias.data = bias[start:end]
        start = end
    return _linear(weight, bias)


def _plain_linear(module: torch.nn.Module) -> bool:
    """A linear whose forward is exactly ``x @ weight.T + bias``: torch's, or AutoTP's
    column-parallel ``LinearLayer`` (whose forward communicates nothing)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    kind = type(module)
    if kind is torch.nn.Linear:
        pass
    elif kind.__name__ == "LinearLayer" and kind.__module__.startswith("deepspeed."):
        if getattr(module, "gather_output", False) or getattr(kind, "tp_overlap_comm", False):
            return False
        if getattr(module, "defer_collectives_to_compiler", False):
            return False
    else:
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype.is_floating_point
        and weight.device.type != "meta"
    )


def direct(module: torch.nn.Module) -> Projection:
    """A plain ``nn.Linear`` as a direct call (no module dispatch); anything else as itself."""
    if type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        if packing_available(module.weight):
            return _linear(module.weight, module.bias)
        return lambda x: F.linear(x, module.weight, module.bias)
    return module


def _activation(act: torch.nn.Module) -> Projection:
    if type(act).__name__ in ("SiLUActivation", "SiLU"):
        return F.silu
    return act
