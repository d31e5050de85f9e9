"""Structured output: constrained decoding from a request's ``response_format``.

A request with ``response_format={"type": "json_object"}`` or ``{"type": "json_schema",
"json_schema": {"schema": {...}}}`` gets a grammar (compiled by xgrammar from the JSON
schema), and each sequence owns a matcher of it. Every step, the engine core asks this
module for a packed token bitmask of the rows that have a grammar, applies it to those
rows' logits before sampling (disallowed tokens become ``-inf``), and feeds each sampled
token back (``accept``). The sequence ends with ``stop`` when its grammar has accepted the
stop token, i.e. the JSON is complete; a sequence cut by ``max_tokens`` ends with
``length`` and its output is incomplete (the output pipeline reports it as not valid).

Why xgrammar (see docs/output.md): it is the default structured-output backend of vLLM and
SGLang, it compiles JSON schemas to a pushdown automaton in milliseconds, precomputes the
context-independent part of each state's token mask, handles byte-fallback SentencePiece
vocabularies (Llama 2's), and its CPU kernels fill a batch's masks without Python loops.

JSON is generated compact (``any_whitespace=False``): separators ``", "`` and ``": "`` and
no free whitespace, so that a model cannot spend ``max_tokens`` on blanks. Output stays
bounded only when the schema bounds it (``maxLength``, ``enum``, ``maxItems``, integer
ranges); an unbounded string may never close within ``max_tokens``.

Costs: the tokenizer info is built once per tokenizer (``tokenizer_info``); compiled
grammars are cached by the compiler (same schema, no recompilation). xgrammar (and torch)
are imported only when a request asks for structured output; ``parse_response_format`` is
light, for the output pipeline and the HTTP layer.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cluster.errors import InvalidRequestError
from cluster.logging_setup import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("engine.decoding.structured")

FormatKind = Literal["text", "json_object", "json_schema"]
FORMAT_KINDS: tuple[str, ...] = ("text", "json_object", "json_schema")
# What json_object means: a top-level JSON object, as OpenAI defines it.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ResponseFormat:
    """A parsed ``response_format``: ``kind`` and, for ``json_schema``, the schema."""

    kind: FormatKind
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool = True

    @property
    def constrained(self) -> bool:
        return self.kind != "text"

    @property
    def effective_schema(self) -> Mapping[str, Any] | None:
        """The schema output must satisfy (``{"type": "object"}`` for json_object)."""
        return JSON_OBJECT_SCHEMA if self.kind == "json_object" else self.schema


def parse_response_format(value: Any) -> ResponseFormat | None:
    """``value`` in OpenAI's shape (dict, JSON string, or ``ResponseFormat``), or None.

    ``{"type": "text"}``, ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}``.
    """
    if value is None or isinstance(value, ResponseFormat):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"response_format is not valid JSON ({exc}); pass an object such as "
                '{"type": "json_object"}',
                param="response_format",
            ) from exc
    if hasattr(value, "model_dump"):  # a pydantic model from the HTTP layer
        value = value.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"response_format must be an object, got {type(value).__name__}",
            param="response_format",
        )
    kind = value.get("type")
    if kind not in FORMAT_KINDS:
        raise InvalidRequestError(
            f"response_format.type={kind!r} is not one of {', '.join(FORMAT_KINDS)}",
            param="response_format.type",
        )
    if kind != "json_schema":
        return ResponseFormat(kind=kind)
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            "response_format.json_schema must be an object with a `schema` field for "
            "type=json_schema",
            param="response_format.json_schema",
        )
    schema = spec.get("schema", spec.get("schema_"))
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    return ResponseFormat(
        kind="json_schema",
        schema=dict(schema),
        name=spec.get("name"),
        strict=bool(spec.get("strict", True)),
    )


# -- tokenizer info, once per tokenizer ----------------------------------------------------

_INFO_LOCK = threading.Lock()
_INFO_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer: Any, vocab_size: int | None = None) -> Any:
    """xgrammar's ``TokenizerInfo`` for an ``engine.tokenizer.Tokenizer``, built once.

    ``vocab_size`` is the model's (its logits width), which may exceed the tokenizer's
    when the embedding is padded; the extra ids are never allowed.
    """
    import xgrammar as xgr

    size = vocab_size or tokenizer.vocab_size
    with _INFO_LOCK:
        per_tokenizer = _INFO_CACHE.setdefault(tokenizer, {})
        info = per_tokenizer.get(size)
        if info is None:
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer.hf_tokenizer, vocab_size=size, stop_token_ids=[tokenizer.eos_token_id]
            )
            per_tokenizer[size] = info
            log.debug(
                "built grammar tokenizer info",
                extra={"vocab_size": size, "vocab_type": str(info.vocab_type)},
            )
    return info


def _tokens_without_control_bytes(info: Any, torch: Any) -> torch.Tensor:
    """A packed bitmask (xgrammar's layout: token i is bit i % 32 of word i // 32) of the
    tokens whose text holds no byte below 0x20; special tokens (the stop token) stay."""
    import numpy as np

    size = info.vocab_size
    allowed = np.zeros(((size + 31) // 32) * 32, dtype=bool)
    special = set(info.special_token_ids) | set(info.stop_token_ids)
    for token_id, text in enumerate(info.decoded_vocab[:size]):
        allowed[token_id] = token_id in special or not any(byte < 0x20 for byte in text)
    packed = np.packbits(allowed, bitorder="little").view("<i4")
    return torch.from_numpy(packed.copy()).unsqueeze(0)


class GrammarState:
    """One sequence's position in its grammar (an xgrammar matcher)."""

    __slots__ = ("matcher", "rejected")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.rejected: int | None = None  # a token the grammar refused (a bug if ever set)

    @property
    def terminated(self) -> bool:
        """The grammar accepted the stop token: the output is complete."""
        return self.matcher.is_terminated()

    @property
    def completed(self) -> bool:
        """What was accepted so far is a complete document (the stop token may follow)."""
        return self.matcher.is_completed()

    def accept(self, token_id: int) -> bool:
        if not self.matcher.accept_token(token_id):
            self.rejected = token_id
            return False
        return True


class StructuredOutput:
    """Compiles grammars for one tokenizer and masks a batch's logits.

    ``compile`` may be called from any thread (the request's, at submit time: a bad schema
    fails the submit, not the batch); ``new_state``, ``apply_masks`` and ``accept`` run in
    the engine core's loop.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int | None = None, *, max_threads: int = 1
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.vocab_size = self.info.vocab_size
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)
        self._bitmask: torch.Tensor | None = None
        import torch

        self._inference_mode = torch.inference_mode
        self._no_control_bytes = _tokens_without_control_bytes(self.info, torch)

    def compile(self, response_format: Any) -> Any | None:
        """The compiled grammar of a ``response_format`` (None when it does not constrain)."""
        fmt = parse_response_format(response_format)
        if fmt is None or not fmt.constrained:
            return None
        schema = json.dumps(fmt.effective_schema)  # key order kept: properties come out in it
        try:
            return self.compiler.compile_json_schema(
                schema, any_whitespace=False, strict_mode=fmt.strict
            )
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its reason
            raise InvalidRequestError(
                f"response_format.json_schema.schema cannot be compiled: {exc}; use a JSON schema "
                "of types object/array/string/number/integer/boolean/null, enum, const, anyOf",
                param="response_format.json_schema.schema",
            ) from exc

    def compile_params(self, params: Any) -> Any | None:
        """The grammar of a request's ``SamplingParams``: its ``guided`` or ``response_format``."""
        if params.guided is not None:
            return self.compile_guided(params.guided)
        return self.compile(params.response_format)

    def compile_guided(self, guided: Mapping[str, str]) -> Any:
        """The compiled grammar of vLLM's guided decoding beyond JSON: ``{"regex": pattern}``
        or ``{"grammar": EBNF}`` (xgrammar's GBNF dialect, root rule ``root``)."""
        kind, source = next(iter(guided.items()))
        try:
            if kind == "regex":
                return self.compiler.compile_regex(source)
            return self.compiler.compile_grammar(source)
        except Exception as exc:
            field = "structured_outputs.regex" if kind == "regex" else "structured_outputs.grammar"
            raise InvalidRequestError(
                f"{field} cannot be compiled: {exc}; check its syntax", param=field
            ) from exc

    def new_state(self, compiled: Any) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(compiled))

    def apply_masks(self, logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
        """Set ``-inf`` on every token row ``i``'s grammar forbids, in place, for the rows
        that have a state; other rows are untouched."""
        rows = [i for i, s in enumerate(states) if s is not None and not s.terminated]
        if not rows:
            return
        batch = logits.shape[0]
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < batch:
            bitmask = self._bitmask = self._xgr.allocate_token_bitmask(
                max(batch, 8), self.vocab_size
            )
        view = bitmask[:batch]
        matchers = [states[i].matcher for i in rows]
        self._batch.batch_fill_next_token_bitmask(matchers, view, indices=rows)
        # xgrammar 0.2.8's JSON strings admit raw control characters, which JSON forbids
        # (RFC 8259 7: U+0000-U+001F must be escaped); compact JSON needs none elsewhere.
        view.bitwise_and_(self._no_control_bytes)
        with self._inference_mode():  # the worker's logits are inference tensors
            if logits.shape[1] > self.vocab_size:  # padded embedding: ids beyond the vocab
                logits[rows, self.vocab_size :] = float("-inf")
            self._xgr.apply_token_bitmask_inplace(
                logits,
                view.to(logits.device),
                vocab_size=min(logits.shape[1], self.vocab_size),
                indices=rows,
            )

    @staticmethod
    def accept(states: Sequence[GrammarState | None], tokens: Sequence[int]) -> None:
        """Advance each row's grammar by its sampled token."""
        for state, token in zip(states, tokens):
            if state is not None and not state.terminated:
                state.accept(token)
