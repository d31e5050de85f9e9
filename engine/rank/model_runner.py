"""The forward pass of one tensor-parallel shard over a slot-based KV cache.

The model stays Hugging Face's ``LlamaForCausalLM`` (possibly with its linear layers replaced
by DeepSpeed AutoTP's sharded ones, or by bitsandbytes' quantized ones): this runner uses its
modules' weights, and only owns what iteration-level batching needs — the KV cache and the
attention over sequences of different lengths. Every tensor-parallel rank runs the same
calls with the same inputs; the sharded linears do the all-reduces.

A step is one pass through the layers: its decode tokens and prompt chunks share the norms
and projections, and only attention runs per group. Per layer, q/k/v run as one matmul and
gate/up as another (``engine.rank.fused_projections``: each rank concatenates its own shards, so
tensor parallelism is unchanged), and rotary embedding is applied to queries and keys
together. The arithmetic of every element is Hugging Face's own, so greedy outputs stay token
for token equal to ``generate``.

KV cache layout, per layer: ``[num_slots, kv_heads_local, max_len, head_dim]``. The scheduler
keeps running sequences in dense slots 0..n-1, so a decode step over all of them attends a
*view* ``cache[:n, :, :L]``, with no gather and no concatenation per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.rank.fused_projections import LayerProjections, build_projections, rms_norm


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
        # Built now, or on the first forward for a lazily loaded model (weights still on meta).
        self._projections: list[LayerProjections] | None = None
        if self.embed.weight.device.type != "meta":
            self._layer_projections()
        # No slot holds KV at or past this position: slot moves copy only the positions below.
        self._written = 0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # -- cache maintenance ------------------------------------------------------------------

    def mark_written(self, n: int) -> None:
        """Positions below ``n`` may now hold KV (a step replayed from a CUDA graph ran no
        Python here; ``engine.rank.cuda_graphs``)."""
        self._written = max(self._written, n)

    def copy_kv(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Copy the first ``tokens`` positions of slot ``src`` into slot ``dst`` (prefix cache)."""
        for src, dst, tokens in copies:
            self._written = max(self._written, tokens)
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst, :, :tokens].copy_(k[src, :, :tokens])
                v[dst, :, :tokens].copy_(v[src, :, :tokens])

    def move_slots(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply the scheduler's slot compaction moves (src -> dst), in order."""
        n = self._written
        for src, dst in moves:
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst, :, :n].copy_(k[src, :, :n])
                v[dst, :, :n].copy_(v[src, :, :n])

    # -- forward ----------------------------------------------------------------------------

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        *,
        kv_len: int | None = None,
        dense: bool | None = None,
    ) -> torch.Tensor:
        """One token for each of B sequences: ``forward`` without prompt chunks."""
        return self.forward(tokens, positions, slots, (), kv_len=kv_len, dense=dense)

    def prefill(self, chunks: Sequence[tuple[Sequence[int], int, int]]) -> torch.Tensor:
        """Prompt chunks alone: ``forward`` without decode rows."""
        return self.forward(None, None, None, chunks)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor | None,
        positions: torch.Tensor | None,
        slots: torch.Tensor | None,
        chunks: Sequence[tuple[Sequence[int], int, int]],
        *,
        kv_len: int | None = None,
        dense: bool | None = None,
    ) -> torch.Tensor:
        """One engine step: B decode tokens and prompt chunks, in one pass through the layers.

        Decode: tokens, positions, slots are int64 ``[B]`` (or None for none); ``positions[b]``
        is where ``tokens[b]`` goes, so sequence b attends keys ``0..positions[b]``.
        ``kv_len`` (``max(positions) + 1``) and ``dense`` (``slots == 0..B-1``) may be passed by
        a caller that knows them, which saves two device syncs.

        Chunks: ``(token_ids, start_position, slot)``. A chunk that starts a prompt attends
        causally to itself; one that continues a prompt (chunked prefill, prefix cache) also
        attends to the KV its slot already holds.

        Every token of the step goes through the norms and projections together, as one
        ``[N, 1, hidden]`` batch (a step that joins a new prompt to the running batch pays for
        one pass, not two); only attention runs per group. Returns logits ``[B + chunks, vocab]``:
        decode rows, then each chunk's last token.
        """
        batch = 0 if tokens is None else tokens.shape[0]
        ids = [tokens] if batch else []
        pos = [positions] if batch else []
        spans = []  # (first row, length, start position, slot) of each chunk
        row = batch
        if chunks:
            prompt_ids: list[int] = []
            for chunk_ids, start, slot in chunks:
                n = len(chunk_ids)
                prompt_ids += chunk_ids
                pos.append(self._arange(start + n)[start:])
                spans.append((row, n, start, slot))
                self._written = max(self._written, start + n)
                row += n
            ids.append(torch.tensor(prompt_ids, dtype=torch.long, device=self.device))
        x = self.embed(ids[0] if len(ids) == 1 else torch.cat(ids))[:, None]  # [N, 1, hidden]
        pos_all = pos[0] if len(pos) == 1 else torch.cat(pos)
        layers = self._layer_projections()
        cos, sin = self._rotary_tables(x, pos_all[:, None])
        decode = self._decode_inputs(positions, slots, kv_len, dense, x.dtype) if batch else None
        masks = [self._continuation_mask(start, n) if start else None for _, n, start, _ in spans]
        nq, hd = self.num_heads, self.head_dim
        for i, (layer, proj) in enumerate(zip(self.layers, layers)):
            q, k, v = proj.qkv_heads(rms_norm(layer.input_layernorm, x), cos, sin)  # [N, 1, H, hd]
            kc, vc = self.k_cache[i], self.v_cache[i]
            outs = []
            if decode is not None:
                outs.append(self._attend_decode(q[:batch], k[:batch], v[:batch], kc, vc, decode))
            for (first, n, start, slot), mask in zip(spans, masks):
                rows = slice(first, first + n)
                outs.append(
                    self._attend_chunk(q[rows], k[rows], v[rows], kc, vc, start, slot, mask)
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + proj.o(out.view(-1, 1, nq * hd))
            x = x + proj.mlp(rms_norm(layer.post_attention_layernorm, x))
        if spans:  # decode rows and each chunk's last token
            last = list(range(batch)) + [first + n - 1 for first, n, _, _ in spans]
            x = x[torch.as_tensor(last, device=self.device)]
        return self._logits(x)

    def _decode_inputs(self, positions, slots, kv_len, dense, dtype) -> tuple:
        """What every layer's decode attention shares: the additive mask, the rows of the
        flattened caches that receive the step's keys and values, and the key range."""
        batch = positions.shape[0]
        if dense is None:
            dense = bool((slots == self._arange(batch)).all())
        if kv_len is None:
            kv_len = int(positions.max().item()) + 1
        self._written = max(self._written, kv_len)
        unseen = self._arange(kv_len)[None, :] > positions[:, None]  # [B, L]
        mask = torch.zeros(batch, 1, 1, kv_len, dtype=dtype, device=self.device)
        mask.masked_fill_(unseen[:, None, None, :], float("-inf"))
        # cache row of (slot, head, position) in the cache viewed as [slots * heads * len, hd]
        heads = self._arange(self.num_kv_heads)
        rows = (slots[:, None] * self.num_kv_heads + heads[None, :]) * self.max_len
        rows = rows + positions[:, None]
        return mask, rows.view(-1), kv_len, None if dense else slots

    def _attend_decode(self, q, k, v, kc, vc, decode) -> torch.Tensor:
        """``[B, 1, H, hd]`` new tokens -> attention output ``[B, heads * hd]``."""
        mask, rows, kv_len, gather = decode
        batch, hd = q.shape[0], self.head_dim
        kc.view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd))
        vc.view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd))
        if gather is None:  # dense slots: a view, no copy
            keys, values = kc[:batch, :, :kv_len], vc[:batch, :, :kv_len]
        else:
            keys, values = kc[gather, :, :kv_len], vc[gather, :, :kv_len]
        out = self._attend(q.transpose(1, 2), keys, values, mask)  # [B, H, 1, hd]
        return out.reshape(batch, -1)

    def _attend_chunk(self, q, k, v, kc, vc, start, slot, mask) -> torch.Tensor:
        """``[T, 1, H, hd]`` prompt tokens at ``start..start+T-1`` -> ``[T, heads * hd]``."""
        n, end = q.shape[0], start + q.shape[0]
        q, k, v = (t[:, 0].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, hd]
        kc[slot, :, start:end] = k[0]
        vc[slot, :, start:end] = v[0]
        if start == 0:
            out = self._attend(q, k, v, None, causal=True)
        else:
            keys, values = kc[slot : slot + 1, :, :end], vc[slot : slot + 1, :, :end]
            out = self._attend(q, keys, values, mask)
        return out[0].transpose(0, 1).reshape(n, -1)

    def _continuation_mask(self, start: int, n: int) -> torch.Tensor:
        """Query at position start+t sees keys 0..start+t."""
        end = start + n
        return (self._arange(end)[None, :] <= self._arange(end)[start:, None])[None, None]

    # -- helpers ----------------------------------------------------------------------------

    def _layer_projections(self) -> list[LayerProjections]:
        if self._projections is None:
            self._projections = [
                build_projections(layer, self.head_dim, self.num_heads, self.num_kv_heads)
                for layer in self.layers
            ]
        return self._projections

    def _rotary_tables(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary cos/sin for ``[B, T]`` positions, shaped ``[B, T, 1, hd]`` for
        ``[B, T, heads, hd]`` inputs; sin carries rotate_half's sign (see ``LayerProjections``)."""
        cos, sin = self.rotary(x, positions)
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(2), signed.unsqueeze(2)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, 1, hidden] -> [B, vocab]``; AutoTP's sharded lm_head slices a 3-D input."""
        return self.lm_head(rms_norm(self.norm, h))[:, 0]

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

