"""The "small" benchmark checkpoint: the catalog's ~91M-parameter Llama 2 architecture (hidden
768, 12 layers) with seeded random weights, drawn as the tiny checkpoint's are, and the tiny
checkpoint's tokenizer. Big enough that a CPU decode step is spent in matmuls, not in Python,
so benchmarks on it measure the engine's compute efficiency. Same seed, same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cluster.catalog import architecture
from engine.tiny.checkpoint import (
    _exclusive_lock,
    checkpoint_fingerprint,
    ensure_tiny_checkpoint,
    random_state_dict,
)

SMALL_SIZE = "small"
DEFAULT_SMALL_DIR = Path("~/.cache/m-ai/checkpoints/small-v1")
MARKER_FILE = "m_ai_small.json"
COPIED_FROM_TINY = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def small_fingerprint(seed: int = 0) -> str:
    """The tiny checkpoint's fingerprint (weights scheme, tokenizer) and the architecture."""
    arch = json.dumps(architecture(SMALL_SIZE).hf_config_dict(), sort_keys=True)
    return f"{checkpoint_fingerprint(seed)}-{hashlib.sha256(arch.encode()).hexdigest()[:8]}"


def ensure_small_checkpoint(cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """The small checkpoint at ``cache_dir`` (default ``~/.cache/m-ai/checkpoints/small-v1``),
    made on first use (~10 s) under a file lock, as ``ensure_tiny_checkpoint`` does."""
    from safetensors.torch import save_file

    target = Path(cache_dir if cache_dir is not None else DEFAULT_SMALL_DIR).expanduser().absolute()
    fingerprint = small_fingerprint(seed)
    if _marker(target) == fingerprint:
        return target
    tiny = ensure_tiny_checkpoint()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _marker(target) == fingerprint:
            return target
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        building.chmod(0o755)
        try:
            for name in COPIED_FROM_TINY:
                shutil.copyfile(tiny / name, building / name)
            state = random_state_dict(seed, size=SMALL_SIZE)
            save_file(state, str(building / "model.safetensors"), metadata={"format": "pt"})
            (building / "config.json").write_text(json.dumps(architecture(SMALL_SIZE).hf_config_dict(), indent=2))
            (building / MARKER_FILE).write_text(json.dumps({"fingerprint": fingerprint, "seed": seed}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return target


def _marker(path: Path) -> str | None:
    try:
        return json.loads((path / MARKER_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None
