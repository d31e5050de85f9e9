"""Cheap, model-free signals of output quality, computed on every finished answer.

They do not judge content; they catch the failures that show in aggregate: answers cut by
``max_tokens`` (truncation), empty answers, degenerate repetition (a model stuck in a loop
repeats its word 3-grams), and JSON that does not parse when ``response_format`` asked for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OutputQuality:
    truncated: bool
    empty: bool
    repetition_ratio: float  # repeated word 3-grams / all word 3-grams, 0 for short answers
    json_valid: bool | None  # None when the request did not ask for JSON


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that already occurred earlier in ``text``."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def assess(
    text: str, finish_reason: str | None, response_format: dict[str, Any] | None = None
) -> OutputQuality:
    json_valid = None
    if response_format and response_format.get("type") in ("json_object", "json_schema"):
        try:
            json.loads(text)
            json_valid = True
        except ValueError:
            json_valid = False
    return OutputQuality(
        truncated=finish_reason == "length",
        empty=not text.strip(),
        repetition_ratio=repetition_ratio(text),
        json_valid=json_valid,
    )


__all__ = ["OutputQuality", "assess", "repetition_ratio"]
