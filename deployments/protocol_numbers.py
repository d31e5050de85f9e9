"""Integer fields of requests as JSON means them: ``89.0`` is the integer 89."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _integral(value: Any) -> Any:
    """JSON has one number type: ``89.0`` is the integer 89 (as JSON Schema reads it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a request: strict (no "5" strings), but 5.0 is 5, as the spec says.
JsonInt = Annotated[int, BeforeValidator(_integral)]
# Bounds go before the validator, or the spec gets pydantic's "ge" instead of "minimum".
PositiveJsonInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonNegativeJsonInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]


# The latest time a request may name (epoch seconds): 2200-01-01; later dates overflow the
# platform's time_t.
MAX_EPOCH_S = 7_258_118_400.0


def bounded_int(ge: int | None = None, le: int | None = None) -> Any:
    """An integer request field within ``[ge, le]`` (bounds first: the spec's ``minimum``)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


__all__ = ["JsonInt", "PositiveJsonInt", "NonNegativeJsonInt", "bounded_int", "MAX_EPOCH_S"]
