"""The project's own tiny Llama 2 checkpoint, made here because no weights can be downloaded.

``make_tiny_checkpoint`` writes a complete Hugging Face layout directory (config, safetensors,
SentencePiece tokenizer with the Llama 2 chat template, generation config) from a seed in a
few seconds; ``ensure_tiny_checkpoint`` makes the embedded default once per machine, safely
when several processes (tensor-parallel ranks, test workers) ask for it at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.catalog import architecture
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger
from engine.tiny import corpus as tiny_corpus

log = get_logger("engine.tiny.checkpoint")

ProgressCallback = Callable[[str, int, int], None]
"""``(step, done, total)``: ``done`` of ``total`` steps are finished; ``step`` names the next."""

TINY_SIZE = "tiny"
DEFAULT_TINY_DIR = Path("~/.cache/m-ai/checkpoints/tiny-v1")
DATA_DIR = Path(__file__).parents[1] / "data"
CHAT_TEMPLATE_FILE = DATA_DIR / "llama2_chat.jinja"
# Written last: a directory without it (or with another fingerprint) is never used.
MARKER_FILE = "m_ai_tiny.json"
# Bump when a change to this module changes the files it writes (see checkpoint_fingerprint).
TINY_FORMAT_VERSION = 1
CORPUS_LINES = 60_000

# Standard deviations of the random weights. Random weights at the usual 0.02 give nearly
# flat logits (std ~0.3, top-1 margin ~0.06): the golden tests compare greedy tokens between
# TP=1 and TP=2 and between batched and unbatched runs in fp32, and fp32 summation-order
# noise (~1e-6) must never flip a top-1 choice, so the margin must be large. lm_head at 0.3
# on a unit-RMS hidden state of width 256 gives logits with std ~4.8 and a mean top-1/top-2
# gap above 1. Sharper attention (q/k at 0.15) and layer outputs comparable to the embedding
# make the next token depend on the whole context, so a cache or masking bug changes the
# output, and greedy decoding wanders over many tokens instead of repeating one.
WEIGHT_STD = {"embed_tokens": 0.5, "lm_head": 0.3, "q_proj": 0.15, "k_proj": 0.15}
DEFAULT_WEIGHT_STD = 0.06

# The SentencePiece settings of Llama 2's tokenizer.model (its trainer_spec), but our vocab.
SENTENCEPIECE_OPTIONS = {
    "model_type": "bpe",
    "character_coverage": 0.9995,
    "byte_fallback": True,
    "split_digits": True,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "max_sentencepiece_length": 16,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
    # Determinism: one thread and every sentence, in order.
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "minloglevel": 2,
}

_SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>"}


def _report(progress: ProgressCallback | None, step: str, done: int, total: int) -> None:
    if progress is not None:
        progress(step, done, total)


def train_tokenizer_model(seed: int = 0, vocab_size: int | None = None) -> bytes:
    """The bytes of a ``tokenizer.model`` trained on the generated corpus; same seed, same bytes."""
    import sentencepiece as spm

    vocab_size = vocab_size or architecture(TINY_SIZE).vocab_size
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tiny_corpus.corpus_lines(seed, CORPUS_LINES),
        model_writer=model,
        vocab_size=vocab_size,
        **SENTENCEPIECE_OPTIONS,
    )
    return model.getvalue()


def _tokenizer_config() -> dict:
    """``tokenizer_config.json`` in the shape of Meta's Llama 2 chat repositories."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token_id, text in _SPECIAL_TOKENS.items()
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "chat_template": CHAT_TEMPLATE_FILE.read_text(encoding="utf-8"),
        "clean_up_tokenization_spaces": False,
        # legacy=True puts SentencePiece's dummy-prefix space after every special token, so
        # "<s>[INST]" encodes as <s> ▁[ INST ], exactly as Meta's reference chat code does.
        "legacy": True,
        "model_max_length": architecture(TINY_SIZE).max_position_embeddings,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }


def _special_tokens_map() -> dict:
    def token(text: str) -> dict:
        return {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {"bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>")}


def _generation_config() -> dict:
    """Llama 2 chat's sampling defaults (temperature 0.6, top_p 0.9)."""
    arch = architecture(TINY_SIZE)
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": arch.max_position_embeddings,
    }


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(
        json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _write_tokenizer_files(out_dir: Path, model_bytes: bytes) -> None:
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    # tokenizer.json is what transformers itself derives from tokenizer.model; shipping it
    # saves every loader the conversion, as Meta's Hugging Face repositories do.
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    hf_tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))


def random_state_dict(seed: int = 0, size: str = TINY_SIZE) -> dict:
    """Seeded random weights of the tiny Llama (or another catalog size), named as
    ``LlamaForCausalLM`` names them.

    Tensors are drawn in sorted-name order from one generator, so the result depends only on
    the seed (and torch's CPU generator), not on how transformers initialises modules.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**architecture(size).hf_config_dict())
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shapes[name], dtype=torch.float32)
            continue
        std = next((v for key, v in WEIGHT_STD.items() if key in name), DEFAULT_WEIGHT_STD)
        state[name] = torch.randn(shapes[name], generator=generator, dtype=torch.float32) * std
    return state


def make_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, progress: ProgressCallback | None = None
) -> Path:
    """Write the tiny Llama 2 checkpoint (Hugging Face layout) into ``out_dir``; return it.

    ``out_dir`` must be missing or empty. The same seed gives byte-identical files.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"out_dir={str(out)!r} exists and is not an empty directory; "
            "give a new path or delete it first",
            param="out_dir",
        )
    out.mkdir(parents=True, exist_ok=True)
    steps = [
        "train tokenizer",
        "write tokenizer files",
        "generate weights",
        "write weights",
        "write configs",
    ]
    total = len(steps)
    started = time.perf_counter()

    _report(progress, steps[0], 0, total)
    model_bytes = train_tokenizer_model(seed)
    _report(progress, steps[1], 1, total)
    _write_tokenizer_files(out, model_bytes)
    _report(progress, steps[2], 2, total)
    state = random_state_dict(seed)
    _report(progress, steps[3], 3, total)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _report(progress, steps[4], 4, total)
    _write_json(out / "config.json", architecture(TINY_SIZE).hf_config_dict())
    _write_json(out / "generation_config.json", _generation_config())
    _write_json(out / MARKER_FILE, {"fingerprint": checkpoint_fingerprint(seed), "seed": seed})
    _report(progress, "done", total, total)
    log.info(
        "made tiny checkpoint",
        extra={"path": str(out), "seconds": round(time.perf_counter() - started, 2)},
    )
    return out


def checkpoint_fingerprint(seed: int = 0) -> str:
    """A digest of what the checkpoint is made from: seed, settings, corpus code and word lists.

    A cached checkpoint with another fingerprint is rebuilt. Edits elsewhere in this module
    (comments, the cache logic) leave it alone; bump ``TINY_FORMAT_VERSION`` for a change
    in how the files are written.
    """
    settings = {
        "version": TINY_FORMAT_VERSION,
        "seed": seed,
        "architecture": architecture(TINY_SIZE).hf_config_dict(),
        "weight_std": [WEIGHT_STD, DEFAULT_WEIGHT_STD],
        "sentencepiece": SENTENCEPIECE_OPTIONS,
        "corpus_lines": CORPUS_LINES,
        "tokenizer_config": _tokenizer_config(),  # holds the chat template
        "special_tokens_map": _special_tokens_map(),
        "generation_config": _generation_config(),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in (Path(tiny_corpus.__file__), tiny_corpus.WORDS_FILE):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _is_complete(path: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fingerprint


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but an empty directory or an older tiny checkpoint."""
    if path.is_dir() and (not any(path.iterdir()) or (path / MARKER_FILE).exists()):
        return
    raise CheckpointError(
        f"cache_dir={str(path)!r} exists and is not a tiny checkpoint made by M-AI; "
        "give another cache_dir or move that path away",
        param="cache_dir",
    )


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``; released when the block ends or the process dies."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_checkpoint(
    cache_dir: str | Path | None = None, *, progress: ProgressCallback | None = None
) -> Path:
    """The embedded tiny checkpoint at ``cache_dir`` (default ``~/.cache/m-ai/checkpoints/tiny-v1``).

    Made on first use. Safe when several processes call it at once: one builds in a temporary
    directory next to the target under a file lock and renames it into place; the others
    wait on the lock and then use the finished directory. A partly written directory is
    never returned, and a directory made by different generator code is replaced.
    """
    target = Path(cache_dir if cache_dir is not None else DEFAULT_TINY_DIR).expanduser().absolute()
    fingerprint = checkpoint_fingerprint()
    if _is_complete(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, fingerprint):
            return target
        if target.exists():
            _check_replaceable(target)
        # Holding the lock, no build is in progress: leftovers are from crashed builds.
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        building.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            make_tiny_checkpoint(building, progress=progress)
            if target.exists():
                stale = Path(
                    tempfile.mkdtemp(prefix=f".{target.name}.tmp-stale-", dir=target.parent)
                )
                os.replace(target, stale / target.name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    log.info("tiny checkpoint ready", extra={"path": str(target)})
    return target
