"""The batched sampler: greedy, temperature, top-k, top-p, repetition penalty, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.errors import InvalidRequestError
from engine.decoding.sampling import Sampler, _apply_repetition_penalty, _mask_top_p, make_generator
from engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Engine ranks run one torch thread; on a busy 2-core machine two threads make these
    # tiny ops ~1000x slower (thread wake-up contention), not more correct.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=make_generator(seed)) * 3


def counts(tokens: torch.Tensor, vocab: int) -> list[int]:
    return torch.bincount(tokens, minlength=vocab).tolist()


def chi_square(observed: list[int], probs: list[float]) -> float:
    total = sum(observed)
    return sum((o - total * p) ** 2 / (total * p) for o, p in zip(observed, probs, strict=True))


def test_greedy_is_argmax_and_logits_are_untouched():
    logits = random_logits(8, 100, 0)
    before = logits.clone()
    tokens = Sampler(seed=0).sample(logits, [GREEDY] * 8)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, logits.argmax(-1))
    mixed = [GREEDY, SamplingParams(temperature=1.0)] * 4
    tokens = Sampler(seed=0).sample(logits, mixed)
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))
    assert torch.equal(logits, before)


def test_greedy_ties_and_nan_pick_what_torch_argmax_picks():
    logits = random_logits(6, 64, 2)
    logits[0] = 1.0  # all tied: the first
    logits[1, [5, 40]] = 100.0  # two tied maxima: the first
    logits[2, [9, 30]] = float("nan")  # NaN counts as largest: the first NaN
    logits[3, -1] = float("inf")
    want = logits.argmax(-1)
    assert want[:3].tolist() == [0, 5, 9]
    assert torch.equal(Sampler(seed=0).sample(logits, [GREEDY] * 6), want)
    assert torch.equal(Sampler(seed=0).sample(logits[::2], [GREEDY] * 3), want[::2])  # strided rows


def test_top_k_1_is_greedy():
    logits = random_logits(16, 500, 1)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 16
    for seed in range(3):
        assert torch.equal(Sampler(seed=seed).sample(logits, params), logits.argmax(-1))


def test_seeded_request_gives_the_same_tokens_alone_or_in_any_batch():
    vocab = 300
    mine = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    others = [
        GREEDY,
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.5, top_p=0.3, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, seed=99),
    ]
    steps = [random_logits(1, vocab, 100 + t) for t in range(30)]

    def run(batch_with: list[SamplingParams], position: int) -> list[int]:
        sampler = Sampler(seed=len(batch_with))  # the shared generator differs per run
        mine_gen = make_generator(mine.seed)
        out = []
        for t, row in enumerate(steps):
            rows = [
                random_logits(1, vocab, 1000 * position + 7 * t + k) for k in range(len(batch_with))
            ]
            rows.insert(position, row)
            params = list(batch_with)
            params.insert(position, mine)
            gens = [make_generator(p.seed + t) if p.seed is not None else None for p in batch_with]
            gens.insert(position, mine_gen)
            prev = [[1, 2, 3]] * len(params)
            tokens = sampler.sample(torch.cat(rows), params, gens, prev)
            out.append(int(tokens[position]))
        return out

    alone = run([], 0)
    assert run(others, 0) == alone
    assert run(others, 2) == alone
    assert run(others * 3, 11) == alone
    assert len(set(alone)) > 5  # it really samples
    other_seed = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=8)
    sampler = Sampler(seed=0)
    gen = make_generator(other_seed.seed)
    different = [int(sampler.sample(row, [other_seed], [gen])[0]) for row in steps]
    assert different != alone


def test_small_top_p_samples_only_from_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous()
    tokens = Sampler(seed=3).sample(logits, [SamplingParams(temperature=1.0, top_p=0.6)] * n)
    observed = counts(tokens, 6)
    assert observed[1] + observed[3] == n  # 0.5 + 0.3 is the smallest set holding 0.6
    # Renormalised inside the nucleus: 0.5/0.8 and 0.3/0.8.
    assert chi_square([observed[1], observed[3]], [0.625, 0.375]) < 25
    tokens = Sampler(seed=3).sample(logits, [SamplingParams(temperature=1.0, top_p=0.4)] * n)
    assert counts(tokens, 6)[1] == n


def test_temperature_sharpens_the_distribution():
    probs = [0.5, 0.3, 0.2]
    n = 20000
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    sharp = [p**2 / sum(q**2 for q in probs) for p in probs]  # temperature 0.5 squares them
    observed_sharp = counts(
        Sampler(seed=4).sample(logits, [SamplingParams(temperature=0.5)] * n), 3
    )
    observed_plain = counts(
        Sampler(seed=4).sample(logits, [SamplingParams(temperature=1.0)] * n), 3
    )
    # Loose bounds (2 degrees of freedom: 25 is p ~ 4e-6) with fixed seeds: not flaky.
    assert chi_square(observed_sharp, sharp) < 25
    assert chi_square(observed_plain, probs) < 25
    assert chi_square(observed_sharp, probs) > 500


def test_masked_tokens_are_never_sampled():
    logits = torch.full((2000, 50), float("-inf"))
    logits[:, [3, 17, 49]] = torch.tensor([0.0, 1.0, -1.0])
    tokens = Sampler(seed=5).sample(logits, [SamplingParams(temperature=2.0, top_p=0.99)] * 2000)
    assert set(tokens.tolist()) == {3, 17, 49}


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1], [-1.0, -1.1, -3.0, -4.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 2
    tokens = Sampler(seed=0).sample(logits, params, prev_tokens=[[0, 2, 0], [0]])
    assert tokens.tolist() == [1, 1]  # 2.0 / 1.5 < 1.9; -1.0 * 1.5 < -1.1
    assert Sampler(seed=0).sample(logits, [GREEDY] * 2).tolist() == [0, 0]
    penalized = _apply_repetition_penalty(logits, [0], params, [[0, 2], []])
    assert penalized[0].tolist() == pytest.approx([2.0 / 1.5, 1.9, -1.5, -1.1])
    assert torch.equal(penalized[1], logits[1])
    with pytest.raises(InvalidRequestError, match="prev_tokens"):
        Sampler(seed=0).sample(logits, params)


def test_shape_mismatches_are_refused():
    with pytest.raises(InvalidRequestError, match="params has 1 entries for 2"):
        Sampler(seed=0).sample(torch.zeros(2, 5), [GREEDY])
    with pytest.raises(InvalidRequestError, match="batch, vocab"):
        Sampler(seed=0).sample(torch.zeros(5), [GREEDY])


def test_seed_helper_accepts_any_int():
    a = torch.rand(3, generator=make_generator(-1))
    b = torch.rand(3, generator=make_generator((1 << 64) - 1))
    assert torch.equal(a, b) and not math.isnan(float(a.sum()))


def test_extreme_uniform_draws_never_land_on_masked_tokens():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]] * 2)
    params = [SamplingParams(temperature=1.0)] * 2
    sampler = Sampler(seed=0)
    for value in (0.0, 1.0 - 2**-24):
        sampler._uniforms = lambda rows, gens, v=value: torch.full((len(rows),), v)
        tokens = sampler.sample(logits, params).tolist()
        assert tokens == ([1, 1] if value == 0.0 else [2, 2])


def reference_nucleus(row: torch.Tensor, p: float) -> set[int]:
    """The textbook nucleus: most likely tokens until their mass reaches p (float64)."""
    probs = torch.softmax(row.double(), dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = set(), 0.0
    for token in order:
        kept.add(token)
        mass += float(probs[token])
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])  # flat rows take the full sort, peaked ones not
def test_top_p_mask_matches_the_textbook_nucleus(scale):
    logits = random_logits(12, 2000, 20) * scale
    ps = [0.3, 0.5, 0.8, 0.9, 0.95, 0.99] * 2
    masked = logits.clone()
    _mask_top_p(masked, list(enumerate(ps)))
    sizes, exact = [], 0
    for row, p in enumerate(ps):
        kept = set(torch.isfinite(masked[row]).nonzero().squeeze(1).tolist())
        reference = reference_nucleus(logits[row], p)
        # Equal up to float32-vs-float64 rounding of the one token right at the boundary.
        assert len(kept ^ reference) <= 1, (row, p)
        exact += kept == reference
        sizes.append(len(kept))
    assert exact >= len(ps) - 1
    if scale == 0.5:
        assert min(sizes) <= 64 < max(sizes)  # both the topk cut and the full sort ran
    if scale == 8.0:
        assert max(sizes) <= 64  # every row was cut among the top-64 candidates
    # Rows are independent of their batch: row 3 alone is cut exactly as in the batch.
    alone = logits[3:4].clone()
    _mask_top_p(alone, [(0, ps[3])])
    assert torch.equal(alone[0], masked[3])
