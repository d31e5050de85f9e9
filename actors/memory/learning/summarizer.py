"""Summaries for episodic memory: extractive (default) and model-backed.

A summary is a list of ``SummarySentence``: the text, the turn it came from and the ids of
the long-term facts that sentence stated, so that a summary never brings back a fact that
was superseded later (the memory drops such sentences when it renders a summary).

``ExtractiveSummarizer`` keeps the most central sentences (cosine similarity to the centroid
of all sentence embeddings, the degree-centrality idea of LexRank; sentences that stated a
fact about the user get a bonus) with maximal marginal relevance against redundancy, within a token budget, in their original order. Summaries of
summaries run the same selection over the sentences of the child summaries, so a long
history costs a bounded number of tokens. ``ModelSummarizer`` asks the served model with a
prompt template (the tiny CPU model cannot summarize; the extractive one is the default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from actors.memory.learning.extraction import Generate, call_model, split_sentences
from engine.embedding.embedders import Embedder

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class SummarySentence:
    text: str
    turn_id: int
    fact_ids: tuple[str, ...] = ()


def fit_sentences(
    sentences: Sequence[SummarySentence], max_tokens: int, count_tokens: TokenCounter
) -> list[SummarySentence]:
    """The leading sentences that fit ``max_tokens`` (one space between sentences)."""
    kept, used = [], 0
    for sentence in sentences:
        cost = count_tokens(sentence.text) + (1 if kept else 0)
        if used + cost > max_tokens:
            break
        kept.append(sentence)
        used += cost
    return kept


class ExtractiveSummarizer:
    """Central, non-redundant sentences within a token budget (see the module docstring)."""

    name = "extractive"

    def __init__(
        self,
        embedder: Embedder,
        count_tokens: TokenCounter,
        relevance_weight: float = 0.7,
        min_words: int = 3,
        fact_bonus: float = 0.15,
    ) -> None:
        self.embedder = embedder
        self.count_tokens = count_tokens
        self.relevance_weight = relevance_weight
        self.min_words = min_words
        self.fact_bonus = fact_bonus

    def summarize(
        self,
        sentences: Sequence[SummarySentence],
        max_tokens: int,
        embeddings: np.ndarray | None = None,
    ) -> list[SummarySentence]:
        """At most ``max_tokens`` tokens of ``sentences`` (``embeddings``: theirs, if known)."""
        pool = [i for i, s in enumerate(sentences) if len(s.text.split()) >= self.min_words]
        if not pool:
            pool = list(range(len(sentences)))
        if not pool:
            return []
        if embeddings is None:
            vectors = self.embedder.embed([sentences[i].text for i in pool])
        else:
            vectors = np.asarray(embeddings, dtype=np.float32)[pool]
        centroid = vectors.mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        centrality = vectors @ centroid
        # A sentence that stated a fact about the user is worth more than small talk.
        centrality = centrality + self.fact_bonus * np.array(
            [bool(sentences[i].fact_ids) for i in pool], dtype=np.float32
        )
        costs = [self.count_tokens(sentences[i].text) + 1 for i in pool]
        chosen: list[int] = []  # positions in pool
        redundancy = np.zeros(len(pool), dtype=np.float32)
        available = np.ones(len(pool), dtype=bool)
        used = 0
        lam = self.relevance_weight
        while available.any():
            scores = lam * centrality - (1 - lam) * redundancy
            scores[~available] = -np.inf
            best = int(np.argmax(scores))
            available[best] = False
            if used + costs[best] > max_tokens:
                continue
            chosen.append(best)
            used += costs[best]
            redundancy = np.maximum(redundancy, vectors @ vectors[best])
        return [sentences[pool[j]] for j in sorted(chosen)]


SUMMARY_PROMPT = """Summarize the conversation excerpt below in at most {max_words} words. Keep
facts about the user, their preferences, decisions and commitments; drop small talk.

{text}

Summary:"""


class ModelSummarizer:
    """A summary written by the served model (``generate``: prompt -> text, sync or async)."""

    name = "model"

    def __init__(
        self, generate: Generate, count_tokens: TokenCounter, template: str = SUMMARY_PROMPT
    ) -> None:
        self.generate = generate
        self.count_tokens = count_tokens
        self.template = template

    async def summarize(
        self,
        sentences: Sequence[SummarySentence],
        max_tokens: int,
        embeddings: np.ndarray | None = None,
    ) -> list[SummarySentence]:
        if not sentences:
            return []
        prompt = self.template.format(
            max_words=max(8, int(max_tokens * 0.7)), text="\n".join(s.text for s in sentences)
        )
        reply = (await call_model(self.generate, prompt)).strip()
        turn_id = min(s.turn_id for s in sentences)
        out = [SummarySentence(text, turn_id) for text in split_sentences(reply)]
        return fit_sentences(out, max_tokens, self.count_tokens)


__all__ = [
    "SummarySentence",
    "ExtractiveSummarizer",
    "ModelSummarizer",
    "SUMMARY_PROMPT",
    "fit_sentences",
]
