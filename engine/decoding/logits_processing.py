"""What happens to a row of logits between the model and the sampler, beyond temperature,
top-k and top-p (``engine.decoding.sampling``), and the log probabilities a request may ask for.

OpenAI's ``presence_penalty`` and ``frequency_penalty`` (as OpenAI documents them and vLLM
applies them: on the tokens generated so far, not the prompt)::

    logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)

``logit_bias`` adds its value to the token's logit (-100 bans it in effect, 100 forces it).
vLLM's ``min_tokens``: until that many tokens are out, the end-of-sequence token and the
request's ``stop_token_ids`` cannot be sampled. ``min_p`` (vLLM): after temperature, tokens
whose probability is below ``min_p`` times the most likely token's are dropped.

Log probabilities are the model's own: the log-softmax of the raw logits, before any of the
above, grammar masks or temperature (vLLM's default, ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.types import SamplingParams, TokenLogprob


def apply_logit_processors(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_tokens: Sequence[Sequence[int]] | None,
    eos_token_id: int | None,
) -> torch.Tensor:
    """A copy of ``logits`` ([B, V] float) with each row's penalties, bias and min_tokens
    ban applied (``logits`` itself when no row asks for any)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits and _needs_change(p, output_tokens, i)]
    if not rows:
        return logits
    out = logits.clone()
    vocab = out.shape[1]
    for i in rows:
        p = params[i]
        produced = output_tokens[i] if output_tokens is not None else ()
        if (p.presence_penalty or p.frequency_penalty) and len(produced):
            ids = torch.as_tensor(list(produced), dtype=torch.long, device=out.device)
            ids = ids[ids < vocab]
            counts = torch.bincount(ids, minlength=vocab).to(out.dtype)
            out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
            bias = torch.tensor([b for t, b in p.logit_bias if 0 <= t < vocab], dtype=out.dtype)
            out[i, ids.to(out.device)] += bias.to(out.device)
        if p.min_tokens and len(produced) < p.min_tokens:
            banned = [t for t in (*p.stop_token_ids, eos_token_id) if t is not None and 0 <= t < vocab]
            if banned:
                out[i, banned] = float("-inf")
    return out


def _needs_change(p: SamplingParams, output_tokens: Sequence[Sequence[int]] | None, i: int) -> bool:
    if p.logit_bias or p.presence_penalty or p.frequency_penalty:
        return True
    if p.min_tokens:
        produced = output_tokens[i] if output_tokens is not None else ()
        return len(produced) < p.min_tokens
    return False


def mask_min_p(scaled: torch.Tensor, rows: list[tuple[int, float]]) -> None:
    """Drop, in place, each listed row's tokens whose probability is below ``min_p`` times
    the row's largest (``scaled``: logits after temperature)."""
    for j, min_p in rows:
        probs = torch.softmax(scaled[j], dim=-1)
        scaled[j].masked_fill_(probs < min_p * probs.max(), float("-inf"))


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]
) -> list[TokenLogprob]:
    """Per row: the log-softmax of ``logits[row]`` at ``tokens[row]`` and its ``tops[row]``
    most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = max(tops, default=0)
    top_values = top_ids = None
    if k:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    chosen = logprobs.gather(1, torch.tensor(list(tokens), dtype=torch.long, device=logits.device).unsqueeze(1))
    result = []
    for row, (token, n) in enumerate(zip(tokens, tops)):
        top = tuple(zip(top_ids[row][:n], top_values[row][:n])) if n else ()
        result.append(TokenLogprob(int(token), float(chosen[row, 0]), top))
    return result


__all__ = ["apply_logit_processors", "mask_min_p", "token_logprobs"]
