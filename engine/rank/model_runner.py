"""The forward pass of one tensor-parallel slice over a block-paged KV cache.

The model stays Hugging Face's ``LlamaForCausalLM`` (possibly with its linear layers replaced
by DeepSpeed AutoTP's sliced ones, or by bitsandbytes' quantized ones): this runner uses its
modules' weights, and only owns what iteration-level batching needs — the KV cache and the
attention over sequences of different lengths. Every tensor-parallel rank runs the same
calls with the same inputs; the sliced linears do the all-reduces.

A step is one pass through the layers: its decode tokens and prompt chunks share the norms
and projections, and only attention runs per sequence. Per layer, q/k/v run as one matmul and
gate/up as another (``engine.rank.fused_projections``: each rank concatenates its own slices, so
tensor parallelism is unchanged), and rotary embedding is applied to queries and keys
together. The arithmetic of every element is Hugging Face's own, so greedy outputs stay token
for token equal to ``generate``.

KV cache layout, per layer: a pool ``[kv_heads_local, num_blocks * block_size, head_dim]``;
block ``b`` holds positions ``b * block_size ..`` of the pool's token axis. A sequence's block
table (``engine.scheduling.block_pool``, built by the scheduler) says which blocks hold its positions.
Each step writes its new keys and values with one ``index_copy_`` per layer, then each
sequence attends exactly its own ``length`` keys: a *view* of the pool when its blocks are
consecutive (the pool places them so whenever it can), else its blocks gathered. No mask is
padded to the longest row, and each call is a plain SDPA over one sequence, which CUDA runs
with its flash or memory-efficient kernels (a prompt chunk that continues cached KV passes
its own causal mask, as long as the chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from engine.rank.cpu_attention import paged_decode_attention, paged_kv_write
from engine.rank.decode_threads import DecodeThreads
from engine.rank.fused_projections import LayerProjections, build_projections, direct, rms_norm

Chunk = tuple[Sequence[int], int, Sequence[int]]  # token ids, start position, block table


class ModelRunner:
    """Runs decode steps and prefill chunks over a pool of KV blocks."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int,
        block_size: int = 16,
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
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (self.num_kv_heads, num_blocks * block_size, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        # Built now, or on the first forward for a lazily loaded model (weights still on meta).
        self._projections: list[LayerProjections] | None = None
        self.decode_threads = DecodeThreads()  # decode attention, sequences shared over threads
        # float32 on the CPU: every decode row's attention in one C++ call per layer (built,
        # or taken from the build cache, now: a first build takes ~30 s, not a first request)
        on_cpu_fp32 = self.device.type == "cpu" and dtype == torch.float32
        self.decode_kernel = paged_decode_attention(self.head_dim) if on_cpu_fp32 else None
        self.kv_write = paged_kv_write() if self.decode_kernel is not None else None
        self._lm_head: Any = None  # built on first use, once the weights are loaded
        if self.embed.weight.device.type != "meta":
            self._layer_projections()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # -- forward ----------------------------------------------------------------------------

    def decode(
        self, tokens: torch.Tensor, positions: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """One token for each of B sequences: ``forward`` without prompt chunks."""
        return self.forward(tokens, positions, tables, ())

    def prefill(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Prompt chunks alone: ``forward`` without decode rows."""
        return self.forward(None, (), (), chunks)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor | None,
        positions: Sequence[int],
        tables: Sequence[Sequence[int]],
        chunks: Sequence[Chunk],
    ) -> torch.Tensor:
        """One engine step: B decode tokens and prompt chunks, in one pass through the layers.

        Decode: ``tokens`` int64 ``[B]`` (or None for none), ``positions[b]`` where
        ``tokens[b]`` goes and ``tables[b]`` its sequence's block table, so sequence b attends
        keys ``0..positions[b]``.

        Chunks: ``(token_ids, start_position, block_table)``. A chunk that starts a prompt
        attends causally to itself; one that continues a prompt (chunked prefill, prefix cache,
        recompute after preemption) also attends to the KV its blocks already hold.

        Every token of the step goes through the norms and projections together, as one
        ``[N, 1, hidden]`` batch; only attention runs per sequence. Returns logits
        ``[B + chunks, vocab]``: decode rows, then each chunk's last token.
        """
        batch = 0 if tokens is None else tokens.shape[0]
        bs = self.block_size
        ids = [tokens] if batch else []
        slots = [t[p // bs] * bs + p % bs for p, t in zip(positions, tables)]
        pos = [torch.tensor(positions, dtype=torch.long, device=self.device)] if batch else []
        reads = [self._kv_source(t, p + 1) for p, t in zip(positions, tables)]
        spans = []  # (first row, length, start, kv source or None, mask or None) per chunk
        row = batch
        if chunks:
            prompt_ids: list[int] = []
            for chunk_ids, start, table in chunks:
                n = len(chunk_ids)
                prompt_ids += chunk_ids
                pos.append(self._arange(start + n)[start:])
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
                if start:
                    spans.append((row, n, start, self._kv_source(table, start + n),
                                  self._continuation_mask(start, n)))
                else:
                    spans.append((row, n, 0, None, None))
                row += n
            ids.append(torch.tensor(prompt_ids, dtype=torch.long, device=self.device))
        x = self.embed(ids[0] if len(ids) == 1 else torch.cat(ids))[:, None]  # [N, 1, hidden]
        pos_all = pos[0] if len(pos) == 1 else torch.cat(pos)
        slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        layers = self._layer_projections()
        cos, sin = self._rotary_tables(x, pos_all[:, None])
        nq, hd = self.num_heads, self.head_dim
        threads = torch.get_num_threads()
        on_cpu = self.device.type == "cpu"
        kernel = self.decode_kernel if batch else None
        if kernel is not None:
            width = -(-(max(positions) + 1) // bs)
            block_tables = torch.tensor([list(t[:width]) + [0] * (width - len(t[:width])) for t in tables],
                                        dtype=torch.long)
            lengths = torch.tensor(positions, dtype=torch.long) + 1
        for i, (layer, proj) in enumerate(zip(self.layers, layers)):
            q, k, v = proj.qkv_heads(rms_norm(layer.input_layernorm, x), cos, sin)  # [N, 1, H, hd]
            kc, vc = self.k_cache[i], self.v_cache[i]
            if self.kv_write is not None:
                self.kv_write(kc, vc, k[:, 0], v[:, 0], slot_index)
            else:
                kc.index_copy_(1, slot_index, k[:, 0].transpose(0, 1))
                vc.index_copy_(1, slot_index, v[:, 0].transpose(0, 1))
            outs = []
            if kernel is not None:
                decoded = kernel(q[:batch, 0], kc, vc, block_tables, lengths, bs, self.scale)  # [B, H, hd]
                outs.append(decoded.view(batch, 1, nq, hd))
            elif batch:
                qd = q[:batch].transpose(1, 2)  # [B, H, 1, hd]
                outs += self.decode_threads.run(
                    lambda b, qd=qd, kc=kc, vc=vc: self._attend(qd[b : b + 1], *self._kv(kc, vc, reads[b]), None),
                    positions, threads, on_cpu)
            for first, n, _start, src, mask in spans:
                rows = slice(first, first + n)
                qc = q[rows, 0].transpose(0, 1)[None]  # [1, H, T, hd]
                if src is None:
                    kk = k[rows, 0].transpose(0, 1)[None]
                    vv = v[rows, 0].transpose(0, 1)[None]
                    out = self._attend(qc, kk, vv, None, causal=True)
                else:
                    out = self._attend(qc, *self._kv(kc, vc, src), mask)
                outs.append(out[0].transpose(0, 1).reshape(n, 1, nq, hd))
            if batch and kernel is None:
                outs[:batch] = [torch.cat(outs[:batch]).view(batch, 1, nq, hd)]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + proj.o(out.view(-1, 1, nq * hd))
            x = x + proj.mlp(rms_norm(layer.post_attention_layernorm, x))
        if spans:  # decode rows and each chunk's last token
            last = list(range(batch)) + [first + n - 1 for first, n, *_ in spans]
            x = x[torch.as_tensor(last, device=self.device)]
        return self._logits(x)

    def _kv_source(self, table: Sequence[int], length: int) -> tuple:
        """Where a sequence's first ``length`` keys are: one run of the pool, or its blocks."""
        bs = self.block_size
        n = -(-length // bs)
        first = table[0]
        if table[n - 1] - first == n - 1 and list(table[:n]) == list(range(first, first + n)):
            return (first * bs, length, None)
        index = torch.tensor(table[:n], dtype=torch.long, device=self.device)
        return (0, length, index)

    def _kv(self, kc: torch.Tensor, vc: torch.Tensor, src: tuple):
        """``[1, kv_heads, length, hd]`` keys and values: a view, or the blocks gathered."""
        start, length, index = src
        if index is None:
            return kc[None, :, start : start + length], vc[None, :, start : start + length]
        heads, hd, bs = self.num_kv_heads, self.head_dim, self.block_size
        keys = kc.view(heads, -1, bs, hd).index_select(1, index).view(1, heads, -1, hd)
        values = vc.view(heads, -1, bs, hd).index_select(1, index).view(1, heads, -1, hd)
        return keys[:, :, :length], values[:, :, :length]

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
        """``[B, 1, hidden] -> [B, vocab]``; AutoTP's sliced lm_head slices a 3-D input."""
        if self._lm_head is None:
            self._lm_head = direct(self.lm_head)  # a plain linear's weight packed once (CPU)
        return self._lm_head(rms_norm(self.norm, h))[:, 0]

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
            cached = torch.arange(max(n, 4096), device=self.device)
            self._arange_cache = cached
        return cached[:n]
