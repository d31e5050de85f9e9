"""Hints for configuration errors: which fields a place in the config tree has, and the known
field closest to a misspelled one (``contxt_length`` -> ``context_length``).

Used by ``cluster.config.model.config_error`` for pydantic's ``extra_forbidden`` errors, and by
``plan_update`` for unknown fields of a live update.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes inside a field annotation (``list[X]``, ``X | None``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def fields_at(root: type[BaseModel], loc: Iterable[Any]) -> list[str] | None:
    """The field names of the model found at ``loc`` (list indexes and dict keys skipped)
    under ``root``, or None when ``loc`` leads out of the typed tree."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            continue  # an index into a list (or a key of a mapping): same item model
        inner = _models_in(field.annotation)
        model = inner[0] if inner else None
    return sorted(model.model_fields) if model is not None else None


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name most like ``name`` (a typo, another case, a missing underscore)."""
    known = list(known)
    by_lower = {k.lower().replace("-", "_"): k for k in known}
    if name.lower().replace("-", "_") in by_lower:
        return by_lower[name.lower().replace("-", "_")]
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return match[0] if match else None


# Fields renamed when "shard" came to mean a hash partition only (a tensor-parallel process is
# a rank): an old config names the new field in its error instead of a near miss.
RENAMED_FIELDS = {
    "shard_num_cpus": "rank_num_cpus",
    "shard_num_gpus": "rank_num_gpus",
    "shard_start_timeout_s": "rank_start_timeout_s",
    "cpu_threads_per_shard": "cpu_threads_per_rank",
}


def unknown_field_hint(name: str, known: Iterable[str] | None) -> str:
    """``did you mean `x`?`` when a known field is close, else the list of known fields."""
    known = list(known or [])
    if RENAMED_FIELDS.get(name) in known:
        return f"it was renamed to `{RENAMED_FIELDS[name]}`"
    suggestion = closest(name, known)
    if suggestion is not None:
        return f"did you mean `{suggestion}`?"
    if known:
        return f"the fields here are: {', '.join(known)}"
    return "remove it"


__all__ = ["fields_at", "closest", "unknown_field_hint", "RENAMED_FIELDS"]
