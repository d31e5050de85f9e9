"""Memory units: every absorbed message kept verbatim, dated, and retrievable.

A unit is one message of one turn: who said it (``speaker``: the message's ``name``, else
its role), when (``at``: the turn's time, i.e. the session's time for imported
conversations), where (session id, turn id, message index), its text, the relative time
expressions it contains resolved against ``at`` (actors/memory/recall/dates.py), and the ids of the
facts extracted from it (a fact points back to its source turns, and its text is added to
the unit's lexical document: fact-augmented keys).

``UserUnits`` holds one user's units with two indexes over them: dense (MiniLM vectors in a
``VectorIndex``, filled by the shard's worker in batches) and lexical (``LexicalIndex``,
BM25, filled at once). Hybrid retrieval reads a second lexical index, ``contextual``, where a
unit's document also holds the text of the two messages before and the two after it in its
session at half weight (``CONTEXT_SPAN``, ``CONTEXT_WEIGHT``): a reply is found by the words of
the question it answers ("What did you paint?" / "Here it is!"), a question by its answer's,
and a unit still ranks above its neighbours for its own words. The span was chosen leaving one
LoCoMo development conversation out (1, 2 or 3 on each side; 2 won two folds of three).

The same idea holds for meaning: hybrid retrieval's dense list searches a second vector index,
``contextual_dense``, whose key for a unit is its own vector plus its session neighbours'
vectors (three on each side) at a fifth of the weight, normalised (``DENSE_CONTEXT_SPAN``,
``DENSE_CONTEXT_WEIGHT``): "Thanks! I'm passionate about fashion" is then found for "why did
she start her store", which its question a turn earlier asked. Chosen the same way, leaving one
LoCoMo development conversation out (span 1-3, weight 0.2-0.7; 3 and 0.2 won two folds of
three, every weight up to 0.5 beat the plain vectors on every conversation). The plain vectors
stay the stored ones (and the ``dense`` mode's); the contextual ones are derived from them.

Units of a session are kept in turn order so that retrieval can offer a hit's neighbours.
Persistence: the units (and their stored vectors) are rows of the user's episodes table
(actors/memory/persistence.py); the lexical and contextual indexes are rebuilt at load.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from actors.memory.recall.dates import TimeMention, annotate
from actors.memory.recall.index import VectorIndex, quantize
from actors.memory.recall.lexical import LexicalIndex
from cluster.config.memory import IndexConfig

ROLE_LABEL = {"user": "User", "assistant": "Assistant"}
CONTEXT_SPAN = 2  # messages on each side whose text joins a unit's contextual document
CONTEXT_WEIGHT = 0.5  # what a neighbour's word counts there: half, as a neighbour's score
DENSE_CONTEXT_SPAN = 3  # messages on each side whose vectors join a unit's contextual vector
DENSE_CONTEXT_WEIGHT = 0.2  # a neighbour's share of it
_CAPITALISED = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-zA-Z'\-]+)")


def entities_of(text: str) -> set[str]:
    """Capitalised words that do not start a sentence (names, places, titles), lower case."""
    from actors.memory.recall.lexical import STOP_WORDS

    found = {m.group(1).lower().removesuffix("'s") for m in _CAPITALISED.finditer(text)}
    return {word for word in found if word not in STOP_WORDS and len(word) > 1}


@dataclass
class MemoryUnit:
    key: int
    session_id: str
    turn_id: int
    index: int  # the message's position in its turn
    role: str
    speaker: str | None
    text: str
    at: float
    times: list[TimeMention] = field(default_factory=list)
    tokens: int = 0  # cost of ``line`` with the shard's tokenizer
    facts: list[str] = field(default_factory=list)  # ids of facts extracted from it
    fact_texts: list[str] = field(default_factory=list)

    @property
    def who(self) -> str:
        return self.speaker or ROLE_LABEL.get(self.role, self.role.capitalize())

    @cached_property
    def line(self) -> str:
        """How the unit reads in a context: speaker, then the text with resolved dates (kept:
        ranking reads it for every hit of every request, and a unit's words never change)."""
        return f"{self.who}: {annotate(self.text, self.times)}"

    @property
    def source(self) -> str:
        return f"{self.session_id}#{self.turn_id}"

    def document(self) -> str:
        """The lexical document: speaker, text, resolved dates, and the facts it stated."""
        labels = " ".join(m.label for m in self.times)
        return " ".join([self.who, self.text, labels, *self.fact_texts])

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "session_id": self.session_id, "turn_id": self.turn_id,
            "index": self.index, "role": self.role, "speaker": self.speaker, "text": self.text,
            "at": self.at, "times": [m.to_json() for m in self.times], "tokens": self.tokens,
            "facts": list(self.facts), "fact_texts": list(self.fact_texts),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryUnit:
        return cls(
            int(data["key"]), str(data["session_id"]), int(data["turn_id"]), int(data["index"]),
            str(data["role"]), data.get("speaker"), str(data["text"]), float(data["at"]),
            [TimeMention.from_json(m) for m in data.get("times", [])], int(data.get("tokens", 0)),
            list(data.get("facts", [])), list(data.get("fact_texts", [])),
        )


class UserUnits:
    """One user's units and their dense and lexical indexes (see the module docstring)."""

    def __init__(self, dimension: int, config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        self.units: dict[int, MemoryUnit] = {}
        self.sessions: dict[str, list[tuple[int, int, int]]] = {}  # (turn_id, index, key), sorted
        self.dense = VectorIndex(dimension, self.config)
        self.lexical = LexicalIndex()
        self.contextual = LexicalIndex()  # documents with their neighbours' words (hybrid)
        self.contextual_dense = VectorIndex(dimension, self.config)  # vectors with their neighbours'
        self.entities: dict[int, set[str]] = {}
        self.speakers: dict[str, int] = {}  # lower-case speaker name -> units
        self.unembedded: list[int] = []
        self.next_key = 1

    def __len__(self) -> int:
        return len(self.units)

    def knows(self, session_id: str, turn_id: int) -> bool:
        order = self.sessions.get(session_id, [])
        at = bisect.bisect_left(order, (turn_id, -1, -1))
        return at < len(order) and order[at][0] == turn_id

    def add(self, unit: MemoryUnit, stored: np.ndarray | None = None, *, bulk: bool = False) -> MemoryUnit:
        """Index a unit (a new key unless it has one); ``stored``: its quantized vector, else
        it waits in ``unembedded`` for the worker. ``bulk``: a load whose caller indexes the
        contextual documents once at the end (``index_contexts``)."""
        if unit.key <= 0 or unit.key in self.units:
            unit.key = self.next_key
        self.next_key = max(self.next_key, unit.key + 1)
        self.units[unit.key] = unit
        bisect.insort(self.sessions.setdefault(unit.session_id, []), (unit.turn_id, unit.index, unit.key))
        self.lexical.add(unit.key, unit.document())
        if not bulk:  # the unit, and its neighbours, whose contexts now hold its words
            for key in (unit.key, *self.neighbours(unit.key, CONTEXT_SPAN)):
                self._index_context(key)
        self.entities[unit.key] = entities_of(unit.text)
        if unit.speaker:
            name = unit.speaker.lower()
            self.speakers[name] = self.speakers.get(name, 0) + 1
        if stored is not None:
            if stored.size:
                self.dense.add_stored(unit.key, stored)
                if not bulk:
                    self._embed_contexts([unit.key])
        else:
            self.unembedded.append(unit.key)
        return unit

    def add_many(self, units: list[MemoryUnit], stored: np.ndarray) -> None:
        """Bulk load into an empty user (imports, benchmarks): ``stored`` holds the units'
        quantized vectors, row for row; the dense index (and its graph) is built once."""
        if self.units:
            raise RuntimeError("add_many loads a user without units only")
        for unit in units:
            self.add(unit, np.zeros(0), bulk=True)  # a placeholder: no per-unit dense insert
        self.dense.add_many_stored(np.asarray([u.key for u in units], dtype=np.int64), stored)
        self.index_contexts()

    def _index_context(self, key: int) -> None:
        around = " ".join(self.units[n].text for n in self.neighbours(key, CONTEXT_SPAN))
        self.contextual.add(key, self.units[key].document(), around, CONTEXT_WEIGHT)

    def index_contexts(self) -> None:
        """Both contextual indexes from scratch (after a bulk load)."""
        for key in self.units:
            self._index_context(key)
        keys: list[int] = []
        vectors: list[np.ndarray] = []
        for order in self.sessions.values():
            session_keys = [key for _, _, key in order]
            context = self._session_context_vectors(session_keys)
            for key, vector in zip(session_keys, context):
                if key in self.dense:
                    keys.append(key)
                    vectors.append(vector)
        if keys and not len(self.contextual_dense):
            self.contextual_dense.add_many_stored(np.asarray(keys, dtype=np.int64),
                                                  self.quantized(np.stack(vectors)))
        else:
            for key, vector in zip(keys, vectors):
                self.contextual_dense.add(key, vector)

    def _session_context_vectors(self, keys: list[int]) -> np.ndarray:
        """Contextual vectors of one session's units (``keys`` in session order): each vector
        plus ``DENSE_CONTEXT_WEIGHT`` times its neighbours' within ``DENSE_CONTEXT_SPAN``, as
        unit rows; a unit not embedded yet adds nothing to its neighbours."""
        plain = np.zeros((len(keys), self.dense.dimension), dtype=np.float32)
        for row, key in enumerate(keys):
            if key in self.dense:
                plain[row] = self.dense.vector(key)
        context = plain.copy()
        for step in range(1, DENSE_CONTEXT_SPAN + 1):
            if step >= len(keys):
                break
            context[step:] += DENSE_CONTEXT_WEIGHT * plain[:-step]
            context[:-step] += DENSE_CONTEXT_WEIGHT * plain[step:]
        norms = np.linalg.norm(context, axis=1, keepdims=True)
        return context / np.maximum(norms, 1e-12)

    def _embed_contexts(self, keys: list[int]) -> None:
        """Refresh the contextual vectors that ``keys``' new vectors change: theirs and their
        neighbours' within the span."""
        affected: set[int] = set()
        for key in keys:
            if key in self.units:
                affected.add(key)
                affected.update(self.neighbours(key, DENSE_CONTEXT_SPAN))
        for key in affected:
            if key not in self.dense:
                continue
            vector = self.dense.vector(key)
            for neighbour in self.neighbours(key, DENSE_CONTEXT_SPAN):
                if neighbour in self.dense:
                    vector = vector + DENSE_CONTEXT_WEIGHT * self.dense.vector(neighbour)
            # in place: each unit is refreshed as up to three later neighbours arrive
            self.contextual_dense.refine(key, vector / max(float(np.linalg.norm(vector)), 1e-12))

    def take_unembedded(self, limit: int) -> list[MemoryUnit]:
        keys, self.unembedded = self.unembedded[:limit], self.unembedded[limit:]
        return [self.units[k] for k in keys if k in self.units]

    def set_vectors(self, units: list[MemoryUnit], vectors: np.ndarray) -> None:
        for unit, vector in zip(units, vectors):
            if unit.key in self.units:
                self.dense.add(unit.key, vector)
        self._embed_contexts([unit.key for unit in units])

    def add_fact(self, session_id: str, turn_id: int, fact_id: str, text: str) -> None:
        """A fact extracted from a turn: its units point to it and are found by its words."""
        for unit in self.of_turn(session_id, turn_id):
            if fact_id not in unit.facts:
                unit.facts.append(fact_id)
                unit.fact_texts.append(text)
                self.lexical.add(unit.key, unit.document())
                self._index_context(unit.key)

    def of_turn(self, session_id: str, turn_id: int) -> list[MemoryUnit]:
        order = self.sessions.get(session_id, [])
        at = bisect.bisect_left(order, (turn_id, -1, -1))
        out = []
        while at < len(order) and order[at][0] == turn_id:
            out.append(self.units[order[at][2]])
            at += 1
        return out

    def neighbours(self, key: int, span: int = 1) -> list[int]:
        """Keys of the units just before and after ``key`` in its session (nearest first)."""
        unit = self.units.get(key)
        if unit is None or span <= 0:
            return []
        order = self.sessions[unit.session_id]
        at = bisect.bisect_left(order, (unit.turn_id, unit.index, unit.key))
        out = []
        for step in range(1, span + 1):
            if at + step < len(order):
                out.append(order[at + step][2])
            if at - step >= 0:
                out.append(order[at - step][2])
        return out

    def remove_session(self, session_id: str) -> int:
        order = self.sessions.pop(session_id, [])
        for _, _, key in order:
            unit = self.units.pop(key, None)
            self.dense.remove(key)
            self.contextual_dense.remove(key)
            self.lexical.remove(key)
            self.contextual.remove(key)
            self.entities.pop(key, None)
            if unit is not None and unit.speaker:
                name = unit.speaker.lower()
                self.speakers[name] = self.speakers.get(name, 1) - 1
                if self.speakers[name] <= 0:
                    del self.speakers[name]
        if order:
            dropped = {key for _, _, key in order}
            self.unembedded = [k for k in self.unembedded if k not in dropped]
        return len(order)

    def nbytes(self) -> int:
        text = sum(len(u.text) + 96 for u in self.units.values())
        return text + self.dense.nbytes() + self.contextual_dense.nbytes()

    # -- persistence ------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[int, int], np.ndarray]:
        """What a write needs, cut on the event loop (``unit_rows`` serializes it later)."""
        rows_of, matrix = self.dense.snapshot()
        return [u.to_json() for u in self.units.values()], rows_of, matrix

    def load_rows(self, rows: list[dict[str, Any]], embedder_matches: bool) -> None:
        """Units back from ``rows`` (``embedder_matches``: their stored vectors are in the
        current embedder's space and dtype; otherwise they are embedded again)."""
        dtype = {"i8": np.int8, "f16": np.float16, "f32": np.float32}[self.dense.dtype]
        for row in rows:
            unit = MemoryUnit.from_json(json.loads(row["data"]))
            vector = row.get("vector")
            stored = None
            if vector is not None and embedder_matches:
                stored = np.frombuffer(vector, dtype=dtype)
                if stored.shape[0] != self.dense.dimension:
                    stored = None
            self.add(unit, stored, bulk=True)
        self.index_contexts()

    def quantized(self, vectors: np.ndarray) -> np.ndarray:
        return quantize(vectors, self.dense.dtype)


def unit_rows(snapshot: tuple[list[dict[str, Any]], dict[int, int], np.ndarray]) -> list[dict[str, Any]]:
    """Rows for the episodes table: one per unit, its JSON and its stored vector."""
    units, rows_of, matrix = snapshot
    out = []
    for data in units:
        row = rows_of.get(data["key"])
        out.append({"kind": "unit", "session_id": data["session_id"], "data": json.dumps(data),
                    "vector": None if row is None else matrix[row].tobytes()})
    return out


__all__ = ["CONTEXT_SPAN", "CONTEXT_WEIGHT", "MemoryUnit", "UserUnits", "entities_of", "unit_rows"]
