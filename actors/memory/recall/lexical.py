"""A small incremental BM25 index (Okapi BM25, k1 = 1.2, b = 0.75) over memory units.

Dense embeddings find paraphrases; they miss rare exact words (names, titles, places,
"Charlotte's Web") that a lexical index finds at once. Documents are added one at a time as
turns are absorbed and removed when forgotten. Postings are per term, append-only arrays of
(document row, term frequency); a removed document is masked out, and the arrays are compacted
once more than half of them is dead. A query scores every posting of its terms with numpy, so
100k documents answer in a few milliseconds. Nothing is persisted: the index is rebuilt from
the units when a user is loaded (``rebuild``), which is a tokenization pass.

``terms`` is the tokenizer: lower case words, English stop words out, plural and common verb
endings folded ("painting", "paints", "painted" -> "paint").
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable

import numpy as np

K1, B = 1.2, 0.75
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
    don't down during each few for from further had hadn't has hasn't have haven't having he he'd
    he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into
    is isn't it it's its itself let's me more most mustn't my myself no nor not of off on once only
    or other ought our ours ourselves out over own same shan't she she'd she'll she's should
    shouldn't so some such than that that's the their theirs them themselves then there there's
    these they they'd they'll they're they've this those through to too under until up very was
    wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while
    who who's whom why why's with won't would wouldn't you you'd you'll you're you've your yours
    yourself yourselves also just really so yeah oh wow hey hi lol like got get gets getting go goes
    going went gone thing things much many lot lots will would did does do done been s t""".split()
)


def stem(word: str) -> str:
    """A light suffix folding (not Porter): enough to join inflections of one word."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 5 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix in ("ing", "ed"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            base = word[: -len(suffix)]
            if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # running -> run, planned -> plan
            return base
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    """The index terms of ``text`` (see the module docstring)."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class LexicalIndex:
    """BM25 over documents keyed by int (see the module docstring)."""

    def __init__(self) -> None:
        self._rows: dict[int, int] = {}  # key -> row
        self._keys = array("q")  # row -> key
        self._lengths = array("f")  # row -> terms in the document
        self._alive = array("b")
        self._postings: dict[str, tuple[array, array]] = {}
        self._doc_terms: dict[int, dict[str, float]] = {}  # row -> its term counts (for removal)
        self._total_length = 0.0
        self._dead = 0
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in self._rows

    def add(self, key: int, text: str, context: str = "", context_weight: float = 0.5) -> None:
        """Index ``text`` under ``key`` (replacing an earlier document of that key); the words
        of ``context`` count ``context_weight`` each (in frequency and in length: BM25F with
        two fields), so a document ranks above its context for its own words."""
        if key in self._rows:
            self.remove(key)
        counts: dict[str, float] = {}
        for term in terms(text):
            counts[term] = counts.get(term, 0) + 1
        for term in terms(context) if context else ():
            counts[term] = counts.get(term, 0) + context_weight
        row = len(self._keys)
        self._keys.append(key)
        length = float(sum(counts.values()))
        self._lengths.append(length)
        self._alive.append(1)
        self._rows[key] = row
        self._doc_terms[row] = counts
        self._total_length += length
        for term, count in counts.items():
            posting = self._postings.get(term)
            if posting is None:
                posting = self._postings[term] = (array("i"), array("f"))
            posting[0].append(row)
            posting[1].append(float(count))
            self._cache.pop(term, None)

    def remove(self, key: int) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        self._alive[row] = 0
        self._total_length -= self._lengths[row]
        self._dead += 1
        for term in self._doc_terms.pop(row, {}):
            self._cache.pop(term, None)
        if self._dead > 64 and self._dead * 2 > len(self._keys):
            self._compact()
        return True

    def _compact(self) -> None:
        survivors = [(int(self._keys[row]), row) for row in range(len(self._keys)) if self._alive[row]]
        old_terms = self._doc_terms
        self.__init__()  # type: ignore[misc]
        for key, row in survivors:
            counts = old_terms[row]
            new_row = len(self._keys)
            self._keys.append(key)
            length = float(sum(counts.values()))
            self._lengths.append(length)
            self._alive.append(1)
            self._rows[key] = new_row
            self._doc_terms[new_row] = counts
            self._total_length += length
            for term, count in counts.items():
                posting = self._postings.setdefault(term, (array("i"), array("f")))
                posting[0].append(new_row)
                posting[1].append(float(count))

    def _posting(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        cached = self._cache.get(term)
        if cached is not None:
            return cached
        posting = self._postings.get(term)
        if posting is None:
            return None
        rows = np.frombuffer(posting[0], dtype=np.int32).copy()
        tfs = np.frombuffer(posting[1], dtype=np.float32).copy()
        alive = np.frombuffer(self._alive, dtype=np.int8)[rows].astype(bool)
        cached = (rows[alive], tfs[alive])
        self._cache[term] = cached
        return cached

    def search(self, query: str | Iterable[str], k: int) -> list[tuple[int, float]]:
        """The ``k`` best (key, BM25 score) for ``query`` (text, or its terms), best first."""
        n = len(self._rows)
        if n == 0 or k <= 0:
            return []
        query_terms = terms(query) if isinstance(query, str) else list(query)
        average = self._total_length / n if n else 1.0
        lengths = np.frombuffer(self._lengths, dtype=np.float32)
        scores: np.ndarray | None = None
        for term in dict.fromkeys(query_terms):
            found = self._posting(term)
            if found is None or not len(found[0]):
                continue
            rows, tfs = found
            df = len(rows)
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            norm = tfs + K1 * (1.0 - B + B * lengths[rows] / max(average, 1e-9))
            if scores is None:
                scores = np.zeros(len(self._keys), dtype=np.float32)
            scores[rows] += idf * tfs * (K1 + 1.0) / norm  # a document occurs once per term
        if scores is None:
            return []
        hits = np.flatnonzero(scores)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        return [(int(self._keys[row]), float(scores[row])) for row in hits]

    def rebuild(self, documents: Iterable[tuple[int, str]]) -> None:
        """Empty the index and add ``documents`` (key, text)."""
        self.__init__()  # type: ignore[misc]
        for key, text in documents:
            self.add(key, text)


__all__ = ["LexicalIndex", "terms", "stem", "STOP_WORDS"]
