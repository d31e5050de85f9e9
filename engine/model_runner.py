"""The forward pass of one tensor-parallel shard over a slot-based KV cache.

The model stays Hugging Face's ``LlamaForCausalLM`` (possibly with its linear layers replaced
by DeepSpeed AutoTP's sharded ones, or by bitsandbytes' quantized ones): this runner calls
its modules, and only owns what iteration-level batching needs — the KV cache and the
attention over sequences of different lengths. Every tensor-parallel rank runs the same
calls with the same inputs; the sharded linears do the all-reduces.

KV cache layout, per layer: ``[num_slots, kv_heads_local, max_len, head_dim]``. The scheduler
keeps running sequences in dense slots 0..n-1, so a decode step over all of them attends a
*view* ``cache[:n, :, :L]``, with no gather and no concatenation per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class ModelRunner:
    """Runs decode steps and prefill chunks for a set of KV slots."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_slots: int,
        max_len: int,
        tp_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        cfg = model.config
        self.model = model
        self.embed = model.model.embed_tokens
        self.layers = list(model.model.layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads // tp_size
        self.num_kv_heads = cfg.num_key_value_heads // tp_size
        self.scale = self.head_dim**-0.5
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (num_slots, self.num_kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # -- cache maintenance ------------------------------------------------------------------

    def copy_kv(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Copy the first ``tokens`` positions of slot ``src`` into slot ``dst`` (prefix cache)."""
        for src, dst, tokens in copies:
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst, :, :tokens].copy_(k[src, :, :tokens])
                v[dst, :, :tokens].copy_(v[src, :, :tokens])

    def move_slots(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply the scheduler's slot compaction moves (src -> dst), in order."""
        for src, dst in moves:
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])

    # -- forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences.

        tokens, positions, slots: int64 ``[B]``; ``positions[b]`` is where ``tokens[b]`` goes,
        so sequence b attends keys ``0..positions[b]``. Returns logits ``[B, vocab]``.
        """
        batch = tokens.shape[0]
        dense = bool(slots[-1].item() == batch - 1) and bool((slots == self._arange(batch)).all())
        kv_len = int(positions.max().item()) + 1
        keep = self._arange(kv_len)[None, :] <= positions[:, None]  # [B, L]
        mask = keep[:, None, None, :]
        pos = positions[:, None]
        x = self.embed(tokens[:, None])
        cos, sin = self.rotary(x, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slots, :, positions] = k[:, :, 0]
            vc[slots, :, positions] = v[:, :, 0]
            if dense:
                keys, values = kc[:batch, :, :kv_len], vc[:batch, :, :kv_len]
            else:
                keys, values = kc[slots, :, :kv_len], vc[slots, :, :kv_len]
            out = self._attend(q, keys, values, mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._logits(x)

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[tuple[Sequence[int], int, int]]) -> torch.Tensor:
        """Run prompt chunks ``(token_ids, start_position, slot)``; logits of each chunk's last token.

        Chunks that start a prompt attend only to themselves (causal), so chunks of similar
        length are right-padded into one batch (padding sits after every real token and is
        never seen). A chunk continuing a prompt (chunked prefill) also attends to its cached
        prefix and runs on its own. Rows come back in the order of ``chunks``.
        """
        rows: list[torch.Tensor | None] = [None] * len(chunks)
        fresh = sorted((i for i, c in enumerate(chunks) if c[1] == 0), key=lambda i: len(chunks[i][0]))
        for group in _length_buckets(fresh, [len(c[0]) for c in chunks]):
            logits = self._prefill_fresh([chunks[i] for i in group])
            for row, i in enumerate(group):
                rows[i] = logits[row]
        for i, (ids, start, slot) in enumerate(chunks):
            if start > 0:
                rows[i] = self._prefill_continuation(ids, start, slot)[0]
        return torch.stack(rows)

    def _prefill_fresh(self, chunks: Sequence[tuple[Sequence[int], int, int]]) -> torch.Tensor:
        batch = len(chunks)
        lengths = [len(c[0]) for c in chunks]
        t_max = max(lengths)
        tokens = torch.zeros(batch, t_max, dtype=torch.long)
        for b, (ids, _start, _slot) in enumerate(chunks):
            tokens[b, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        tokens = tokens.to(self.device)
        positions = self._arange(t_max)[None, :].expand(batch, t_max)
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            for b, ((_, _, slot), n) in enumerate(zip(chunks, lengths)):
                kc[slot, :, :n] = k[b, :, :n]
                vc[slot, :, :n] = v[b, :, :n]
            out = self._attend(q, k, v, None, causal=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, t_max, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.as_tensor([n - 1 for n in lengths], device=self.device)
        return self._logits(x[torch.arange(batch, device=self.device), last][:, None])

    def _prefill_continuation(self, ids: Sequence[int], start: int, slot: int) -> torch.Tensor:
        n = len(ids)
        end = start + n
        tokens = torch.as_tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = self._arange(end)[start:][None, :]
        # query at position start+t sees keys 0..start+t
        mask = (self._arange(end)[None, :] <= positions[0, :, None])[None, None]
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slot, :, start:end] = k[0]
            vc[slot, :, start:end] = v[0]
            out = self._attend(q, kc[slot : slot + 1, :, :end], vc[slot : slot + 1, :, :end], mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._logits(x[:, -1:])

    # -- helpers ----------------------------------------------------------------------------

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, 1, hidden] -> [B, vocab]``; AutoTP's sharded lm_head slices a 3-D input."""
        return self.lm_head(self.norm(h))[:, 0]

    def _qkv(self, layer, x, cos, sin):
        """Projected, rotated ``[B, heads, T, head_dim]`` queries, keys and values of ``x``."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (x.shape[0], x.shape[1], -1, self.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _attend(self, q, keys, values, mask, causal: bool = False):
        # enable_gqa shares each key/value head among its query heads without copying them
        # (repeat_interleave made attention 2.3x slower at batch 32 on the CPU).
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )

    def _arange(self, n: int) -> torch.Tensor:
        cached = getattr(self, "_arange_cache", None)
        if cached is None or cached.numel() < n:
            cached = torch.arange(max(n, self.max_len), device=self.device)
            self._arange_cache = cached
        return cached[:n]


def _length_buckets(order: list[int], lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Split indices sorted by length into groups whose padding stays under ``max_waste``."""
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1] + [i]
            padded = lengths[i] * len(group)  # sorted: i is the longest so far
            if padded <= (1 + max_waste) * sum(lengths[j] for j in group):
                groups[-1] = group
                continue
        groups.append([i])
    return groups
