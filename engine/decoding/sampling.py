"""The batched sampler: one next token per row of a ``[B, V]`` logits matrix.

Each row follows its own ``SamplingParams``: greedy (``temperature == 0``), temperature,
top-k, top-p and a repetition penalty (Hugging Face semantics: a token already seen in the
prompt or output has a positive logit divided by the penalty, a negative one multiplied).

Cost is paid only where asked: an all-greedy batch without penalties is one ``argmax``
(numpy's on the CPU, several times faster than torch's);
top-k and top-p run only on the rows that set them.

Reproducible seeds: a request with a seed owns a ``torch.Generator`` (``make_generator``),
from which each step draws exactly one uniform number; the token is then picked by inverse
CDF (``searchsorted`` on the cumulative probabilities). Every operation on a row depends
only on that row, so a seeded request yields the same tokens alone or in any batch. Rows
without a seed draw from the sampler's shared generator. Uniforms are drawn on the CPU
(a handful of floats), so a seed also gives the same draws on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cluster.errors import InvalidRequestError
from engine.decoding.logits_processing import apply_logit_processors, mask_min_p
from engine.types import SamplingParams

_SEED_MASK = (1 << 64) - 1
# Peaked (real) distributions keep their top-p nucleus within this many tokens.
_TOP_P_CANDIDATES = 64


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one request's draws (any int; reduced modulo 2**64)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed & _SEED_MASK)
    return generator


class Sampler:
    """Samples one token per row; keeps the shared generator for rows without a seed."""

    def __init__(self, seed: int | None = None, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id  # what min_tokens holds back
        self._shared = torch.Generator(device="cpu")
        if seed is None:
            self._shared.seed()  # nondeterministic, from the OS
        else:
            self._shared.manual_seed(seed & _SEED_MASK)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        prev_tokens: Sequence[Sequence[int] | torch.Tensor] | None = None,
        output_tokens: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """The next token of each row, ``int64[B]`` on ``logits.device``.

        ``generators[i]`` is row i's own generator (None: the shared one); ``prev_tokens[i]``
        are the prompt + output tokens the repetition penalty looks at (needed only for rows
        whose penalty is not 1; an int64 tensor the caller keeps per request avoids a list
        conversion each step). ``output_tokens[i]``: row i's output so far, for the
        presence/frequency penalties and min_tokens (``engine.decoding.logits_processing``).
        ``logits`` is not modified.
        """
        batch, vocab = self._check(logits, params, generators, prev_tokens)
        if logits.dtype != torch.float32:
            logits = logits.float()

        penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalized:
            if prev_tokens is None:
                raise InvalidRequestError(
                    f"row {penalized[0]} sets repetition_penalty but prev_tokens is None; "
                    f"pass each row's prompt + output tokens",
                    param="prev_tokens",
                )
            logits = _apply_repetition_penalty(logits, penalized, params, prev_tokens)
        if any(p.processes_logits for p in params):
            logits = apply_logit_processors(logits, params, output_tokens, self.eos_token_id)

        sampled_rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
        if not sampled_rows:
            return _argmax(logits)
        if len(sampled_rows) == batch:
            return self._sample_rows(logits, sampled_rows, params, generators, vocab)
        device = logits.device
        out = _argmax(logits)  # greedy rows; sampled rows overwritten below
        index = torch.tensor(sampled_rows, device=device)
        out[index] = self._sample_rows(logits[index], sampled_rows, params, generators, vocab)
        return out

    # ------------------------------------------------------------------ internals

    def _sample_rows(
        self,
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None,
        vocab: int,
    ) -> torch.Tensor:
        """Sample ``logits`` (one row per entry of ``rows``, the batch indices)."""
        device = logits.device
        temps = torch.tensor([params[i].temperature for i in rows], device=device)
        scaled = logits / temps.unsqueeze(1)  # a new tensor: masking below is in place

        top_k = [(j, params[i].top_k) for j, i in enumerate(rows) if 0 < params[i].top_k < vocab]
        if top_k:
            _mask_top_k(scaled, top_k)
        top_p = [(j, params[i].top_p) for j, i in enumerate(rows) if params[i].top_p < 1.0]
        if top_p:
            _mask_top_p(scaled, top_p)
        min_p = [(j, params[i].min_p) for j, i in enumerate(rows) if params[i].min_p > 0.0]
        if min_p:
            mask_min_p(scaled, min_p)

        probs = torch.softmax(scaled, dim=-1)
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        uniforms = self._uniforms(rows, generators).to(device).unsqueeze(1)
        # Strictly below the total, so the search lands on a token with nonzero probability
        # (a zero-probability token never raises the cdf, and right=True skips equal values).
        target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return tokens.clamp_(max=vocab - 1)

    def _uniforms(
        self, rows: list[int], generators: Sequence[torch.Generator | None] | None
    ) -> torch.Tensor:
        """One U[0, 1) per row: from the row's own generator, or the shared one."""
        if generators is None or all(generators[i] is None for i in rows):
            return torch.rand(len(rows), generator=self._shared)
        values = torch.empty(len(rows))
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            values[shared] = torch.rand(len(shared), generator=self._shared)
        for j, i in enumerate(rows):
            generator = generators[i]
            if generator is not None:
                values[j] = torch.rand(1, generator=generator)
        return values

    @staticmethod
    def _check(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None,
        prev_tokens: Sequence[Sequence[int]] | None,
    ) -> tuple[int, int]:
        if logits.dim() != 2:
            raise InvalidRequestError(
                f"logits has shape {tuple(logits.shape)}; pass a [batch, vocab] matrix",
                param="logits",
            )
        batch, vocab = logits.shape
        for name, value in (
            ("params", params),
            ("generators", generators),
            ("prev_tokens", prev_tokens),
        ):
            if value is not None and len(value) != batch:
                raise InvalidRequestError(
                    f"{name} has {len(value)} entries for {batch} logits rows; pass one per row",
                    param=name,
                )
        return batch, vocab


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest entry (NaN counts as largest, as in torch.argmax)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        # numpy's SIMD argmax is ~10x faster than torch's on the CPU ([32, 4096]: 12 vs 120 us).
        return torch.from_numpy(np.argmax(logits.detach().numpy(), axis=-1))
    return logits.argmax(dim=-1)


def _apply_repetition_penalty(
    logits: torch.Tensor,
    rows: list[int],
    params: Sequence[SamplingParams],
    prev_tokens: Sequence[Sequence[int] | torch.Tensor],
) -> torch.Tensor:
    """A copy of ``logits`` with HF's repetition penalty applied to ``rows``.

    Touches only the seen entries (O(total seen tokens), not O(rows x vocab)). A token seen
    several times is written several times with the same value, which is harmless.
    """
    device = logits.device
    seen = [torch.as_tensor(prev_tokens[i], dtype=torch.long, device=device) for i in rows]
    lengths = torch.tensor([len(t) for t in seen], device=device)
    penalties = torch.tensor([params[i].repetition_penalty for i in rows], device=device)
    cols = torch.cat(seen)
    row_index = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)
    penalty = torch.repeat_interleave(penalties, lengths)
    out = logits.clone()
    values = out[row_index, cols]
    out[row_index, cols] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def _mask_top_k(scaled: torch.Tensor, rows: list[tuple[int, int]]) -> None:
    """Keep each listed row's ``k`` largest logits (ties with the k-th kept), in place."""
    ks = torch.tensor([k for _, k in rows], device=scaled.device)
    whole = len(rows) == scaled.shape[0]  # every row: no gather/scatter copies
    index = None if whole else torch.tensor([j for j, _ in rows], device=scaled.device)
    sub = scaled if whole else scaled[index]
    top = torch.topk(sub, int(ks.max()), dim=-1).values  # sorted, largest first
    threshold = top.gather(1, (ks - 1).unsqueeze(1))
    if whole:
        scaled.masked_fill_(scaled < threshold, float("-inf"))
    else:
        scaled[index] = sub.masked_fill(sub < threshold, float("-inf"))


def _mask_top_p(scaled: torch.Tensor, rows: list[tuple[int, float]]) -> None:
    """Keep each listed row's nucleus, in place: its most likely tokens down to the one at
    which their total probability first reaches ``p`` (tokens tied with that one included).

    The cut-off probability is found among the row's ``_TOP_P_CANDIDATES`` largest
    probabilities when they already hold ``p`` (peaked distributions: a cheap ``topk``);
    only flatter rows pay for a full sort (of values only). Either way the result depends
    only on the row.
    """
    device = scaled.device
    top_p = torch.tensor([p for _, p in rows], device=device).unsqueeze(1)
    whole = len(rows) == scaled.shape[0]
    index = None if whole else torch.tensor([j for j, _ in rows], device=device)
    sub = scaled if whole else scaled[index]
    probs = torch.softmax(sub, dim=-1)
    candidates = torch.topk(probs, min(_TOP_P_CANDIDATES, probs.shape[1]), dim=-1).values
    threshold = _cutoff(candidates, top_p)
    flat = (candidates.sum(dim=-1, keepdim=True) < top_p).squeeze(1)
    if bool(flat.any()):
        flat_rows = flat.nonzero().squeeze(1)
        threshold[flat_rows] = _cutoff(_sorted_descending(probs[flat_rows]), top_p[flat_rows])
    if whole:
        scaled.masked_fill_(probs < threshold, float("-inf"))
    else:
        scaled[index] = sub.masked_fill(probs < threshold, float("-inf"))


def _cutoff(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the probability at which the running total first reaches ``top_p``
    (the last value when rounding keeps the total just below it)."""
    reached = torch.cumsum(sorted_probs, dim=-1) >= top_p
    last = torch.full_like(top_p, sorted_probs.shape[1] - 1, dtype=torch.long)
    first = torch.where(
        reached.any(dim=-1, keepdim=True), reached.byte().argmax(dim=-1, keepdim=True), last
    )
    return sorted_probs.gather(1, first)


def _sorted_descending(probs: torch.Tensor) -> torch.Tensor:
    if probs.device.type == "cpu":
        # numpy's value-only sort is several times faster than torch.sort on the CPU.
        values = np.sort(probs.numpy(), axis=-1)[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(values))
    return torch.sort(probs, dim=-1, descending=True).values
