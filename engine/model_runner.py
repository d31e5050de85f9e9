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
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
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
    def prefill(
        self, chunks: Sequence[tuple[Sequence[int], int, int]]
    ) -> torch.Tensor:
        """Run prompt chunks ``(token_ids, start_position, slot)``; logits of each chunk's last token.

        Chunks of different lengths are right-padded into one batch; padded queries and keys
        are masked out, and only real positions are written to the cache.
        """
        batch = len(chunks)
        lengths = [len(c[0]) for c in chunks]
        t_max = max(lengths)
        tokens = torch.zeros(batch, t_max, dtype=torch.long, device=self.device)
        positions = torch.zeros(batch, t_max, dtype=torch.long, device=self.device)
        for b, (ids, start, _slot) in enumerate(chunks):
            n = len(ids)
            tokens[b, :n] = torch.as_tensor(ids, dtype=torch.long)
            positions[b, :n] = torch.arange(start, start + n)
            positions[b, n:] = start + n - 1  # padding repeats the last position; masked anyway
        kv_len = max(start + n for (_, start, _), n in zip(chunks, lengths))
        # query t of chunk b sees keys 0..start_b+t (causal, including its cached prefix)
        key_idx = self._arange(kv_len)
        mask = (key_idx[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]
        slots = [c[2] for c in chunks]
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, t_max, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, t_max, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, t_max, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            for b, ((_, start, slot), n) in enumerate(zip(chunks, lengths)):
                kc[slot, :, start : start + n] = k[b, :, :n]
                vc[slot, :, start : start + n] = v[b, :, :n]
            keys = torch.stack([kc[s, :, :kv_len] for s in slots])
            values = torch.stack([vc[s, :, :kv_len] for s in slots])
            out = self._attend(q, keys, values, mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, t_max, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.as_tensor([n - 1 for n in lengths], device=self.device)
        h_last = x[torch.arange(batch, device=self.device), last]
        return self._logits(h_last[:, None])

    # -- helpers ----------------------------------------------------------------------------

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, 1, hidden] -> [B, vocab]``; AutoTP's sharded lm_head slices a 3-D input."""
        return self.lm_head(self.norm(h))[:, 0]

    def _attend(self, q, keys, values, mask):
        # enable_gqa shares each key/value head among its query heads without copying them
        # (repeat_interleave made attention 2.3x slower at batch 32 on the CPU).
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )

    def _arange(self, n: int) -> torch.Tensor:
        cached = getattr(self, "_arange_cache", None)
        if cached is None or cached.numel() < n:
            cached = torch.arange(max(n, self.max_len), device=self.device)
            self._arange_cache = cached
        return cached[:n]
