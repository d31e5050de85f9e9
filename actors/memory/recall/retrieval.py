"""Hybrid retrieval over memory units, and packing the found units into a token budget.

``rank_units`` ranks one user's units for a query (docs/memory.md, "Retrieval"):

1. dense: the query's MiniLM vector against the units' vectors (``candidates`` nearest); in
   mode ``hybrid`` against their contextual vectors, which hold their session neighbours'
   vectors at a fifth of the weight (``UserUnits.contextual_dense``);
2. lexical: BM25 over the units' documents (``candidates`` best); in mode ``hybrid`` each
   document also holds its session neighbours' words at half weight (``UserUnits.contextual``);
3. the two lists fused by reciprocal rank fusion: ``sum 1 / (rrf_k + rank)``;
4. signals (mode ``hybrid``): units said by a person the question names, or naming the same
   capitalised entities, are boosted; for a question about time ("when", "how long ago")
   units that carry a resolved date are boosted, and when it names a span ("in May 2023",
   "before 2023") units dated in it are boosted;
5. a hit's neighbours in its session (the question before an answer, the answer after a
   question) are offered with ``neighbour_weight`` times the hit's score, unless they rank
   higher on their own.

Modes ``dense``, ``lexical`` and ``fused`` stop after steps 1, 2 and 3 (the LoCoMo benchmark
reports each, so that every part has to earn its place).

``pack_units`` then fills a token budget with the best units, grouped by session under a date
header, in conversation order inside a session, each unit at most once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from actors.memory.recall.dates import as_day, day_label, question_time
from actors.memory.recall.lexical import stem, terms
from actors.memory.units import MemoryUnit, UserUnits, entities_of
from cluster.config.memory import UnitRetrievalConfig

MODES = ("dense", "lexical", "fused", "hybrid")


@dataclass(frozen=True)
class RecalledUnit:
    """A unit offered to one request (plain values: it crosses the actor boundary)."""

    key: int
    session_id: str
    turn_id: int
    index: int
    at: float
    line: str
    tokens: int
    score: float

    @property
    def source(self) -> str:
        return f"{self.session_id}#{self.turn_id}"


def _rrf(lists: list[list[int]], k: float) -> dict[int, float]:
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, key in enumerate(ranked):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank + 1)
    return scores


def rank_units(
    units: UserUnits,
    query: str,
    vector: np.ndarray | None,
    config: UnitRetrievalConfig,
    *,
    mode: str | None = None,
    exclude: Callable[[MemoryUnit], bool] | None = None,
) -> list[RecalledUnit]:
    """The user's units for ``query``, best first (see the module docstring)."""
    mode = mode or config.mode
    if not len(units) or not query.strip():
        return []
    lists: list[list[int]] = []
    if mode in ("dense", "fused", "hybrid") and vector is not None and len(units.dense):
        # hybrid: vectors with their neighbours' meaning (actors/memory/units.py)
        vectors = units.contextual_dense if mode == "hybrid" and len(units.contextual_dense) else units.dense
        lists.append([key for key, _ in vectors.search(vector, config.candidates)])
    if mode in ("lexical", "fused", "hybrid"):
        words = terms(query)
        if mode == "hybrid":  # who is asked about is the speaker signal's part, not the words'
            speakers = {stem(part) for name in units.speakers for part in name.split()}
            words = [w for w in words if w not in speakers] or words
        # hybrid: documents with their neighbours' words (actors/memory/units.py)
        index = units.contextual if mode == "hybrid" else units.lexical
        lists.append([key for key, _ in index.search(words, config.candidates)])
    scores = _rrf(lists, config.rrf_k)
    if mode == "hybrid" and scores:
        _apply_signals(units, query, scores, config)
    hits = sorted(scores.items(), key=lambda item: -item[1])
    if mode == "hybrid" and config.neighbours > 0:
        offered = dict(scores)
        for key, score in hits:
            for neighbour in units.neighbours(key, config.neighbours):
                lent = score * config.neighbour_weight
                if offered.get(neighbour, 0.0) < lent:
                    offered[neighbour] = lent
        hits = sorted(offered.items(), key=lambda item: -item[1])
    out: list[RecalledUnit] = []
    for key, score in hits:
        unit = units.units.get(key)
        if unit is None or (exclude is not None and exclude(unit)):
            continue
        out.append(RecalledUnit(unit.key, unit.session_id, unit.turn_id, unit.index, unit.at,
                                unit.line, unit.tokens, score))
        if len(out) >= config.max_units:
            break
    return out


def _apply_signals(units: UserUnits, query: str, scores: dict[int, float], config: UnitRetrievalConfig) -> None:
    words = set(terms(query)) | {w.lower().strip("?,.!") for w in query.replace("'s", " ").split()}
    named = {name for name in units.speakers if name in words or name.split()[0] in words}
    # other entities than the speakers (a speaker's name mostly marks who is addressed)
    speakers = {part for name in units.speakers for part in name.split()}
    wanted = entities_of(" " + query) - speakers  # the leading space: a first word counts too
    when = question_time(query)
    for key in scores:
        unit = units.units[key]
        boost = 1.0
        if named and unit.speaker and unit.speaker.lower() in named:
            boost += config.speaker_weight
        if wanted and units.entities.get(key, set()) & wanted:
            boost += config.entity_weight
        if when.asks_when and unit.times:
            boost += config.time_weight
        if when.has_span:
            spans = [(unit.at, unit.at + 1.0)] + [(m.start, m.end) for m in unit.times]
            if any(when.matches(start, end) for start, end in spans):
                boost += config.time_weight
        scores[key] *= boost


@dataclass
class PackedUnits:
    text: str
    cost: int
    keys: list[int]
    sources: set[str] = field(default_factory=set)  # "session#turn" of the units shown


@lru_cache(maxsize=4096)  # a session's units share their time: one label per session
def session_header(at: float) -> str:
    return f"[{day_label(as_day(at))}]"


def pack_units(
    recalled: list[RecalledUnit],
    budget: int,
    count_tokens: Callable[[str], int],
    header: str,
) -> PackedUnits:
    """The best of ``recalled`` that fit ``budget`` tokens, grouped by session under a date
    header (sessions oldest first, units in conversation order)."""
    if budget <= 0 or not recalled:
        return PackedUnits("", 0, [])
    cost = count_tokens(header) + 1
    if cost >= budget:
        return PackedUnits("", 0, [])
    groups: dict[tuple[str, str], list[RecalledUnit]] = {}
    header_costs: dict[str, int] = {}
    seen: set[int] = set()
    for unit in recalled:
        if unit.key in seen:
            continue
        label = session_header(unit.at)
        group = (unit.session_id, label)
        extra = unit.tokens + 1
        if group not in groups:
            if label not in header_costs:
                header_costs[label] = count_tokens(label) + 1
            extra += header_costs[label]
        if cost + extra > budget:
            continue
        cost += extra
        seen.add(unit.key)
        groups.setdefault(group, []).append(unit)
    if not groups:
        return PackedUnits("", 0, [])
    ordered = sorted(groups.items(), key=lambda item: (min(u.at for u in item[1]), item[0][0]))
    lines = [header]
    keys: list[int] = []
    for (_, label), members in ordered:
        lines.append(label)
        for unit in sorted(members, key=lambda u: (u.turn_id, u.index)):
            lines.append(unit.line)
            keys.append(unit.key)
    sources = {unit.source for members in groups.values() for unit in members}
    return PackedUnits("\n".join(lines), cost, keys, sources)


__all__ = ["MODES", "RecalledUnit", "PackedUnits", "rank_units", "pack_units", "session_header"]
