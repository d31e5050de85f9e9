"""The tiny checkpoint: layout, determinism, loadability, logits fit for golden tests, and the
concurrency-safe cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.catalog import architecture
from cluster.errors import CheckpointError
from engine.tiny.checkpoint import (
    MARKER_FILE,
    checkpoint_fingerprint,
    ensure_tiny_checkpoint,
    make_tiny_checkpoint,
    random_state_dict,
)
from tests.support.paths import REPO_ROOT

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]


def digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def test_layout_and_config(tiny_checkpoint):
    for name in FILES:
        assert (tiny_checkpoint / name).is_file(), name
    assert (
        json.loads((tiny_checkpoint / "config.json").read_text())
        == architecture("tiny").hf_config_dict()
    )
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (
        json.loads((tiny_checkpoint / MARKER_FILE).read_text())["fingerprint"]
        == checkpoint_fingerprint()
    )


def test_same_seed_gives_byte_identical_files(tiny_checkpoint, tmp_path):
    steps = []
    out = make_tiny_checkpoint(tmp_path / "fresh", seed=0, progress=lambda *a: steps.append(a))
    assert digests(out) == digests(tiny_checkpoint)
    done = [d for _, d, _ in steps]
    assert done == sorted(done) and steps[-1][1] == steps[-1][2] == len(steps) - 1


def test_another_seed_gives_other_weights():
    a, b = random_state_dict(0), random_state_dict(1)
    assert a.keys() == b.keys()
    assert not a["lm_head.weight"].equal(b["lm_head.weight"])
    assert a["model.norm.weight"].equal(b["model.norm.weight"])


def test_make_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        make_tiny_checkpoint(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    loaded, info = LlamaForCausalLM.from_pretrained(str(tiny_checkpoint), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return loaded.eval()


def test_transformers_loads_the_weights_as_written(model, tiny_checkpoint):
    from safetensors.torch import load_file

    written = load_file(str(tiny_checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert written.keys() == state.keys()
    assert all(state[name].equal(tensor) for name, tensor in written.items())
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 4096


def test_greedy_logits_have_wide_margins_and_varied_tokens(model, tiny_checkpoint):
    """Golden tests compare greedy tokens across TP and batching in fp32: top-1 must be clear."""
    import torch

    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        tok.encode("Once upon a time"),
        tok.encode('{"name": "Alice", "age": 42}'),
        tok.encode("Le café est très bon"),
    ]
    gaps, spreads = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a busy machine
    try:
        for prompt in prompts:
            _greedy_stats(model, prompt, gaps, spreads)
    finally:
        torch.set_num_threads(threads)
    assert min(gaps) > 0.1, gaps
    assert min(spreads) > 2.0, spreads


def _greedy_stats(model, prompt, gaps, spreads):
    """64 greedy tokens after ``prompt``; appends the mean top-1/top-2 gap and logit std."""
    import torch

    ids, step_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(64):  # a full forward per step: short sequences, no cache to get wrong
            logits = model(torch.tensor([ids])).logits[0, -1]
            step_logits.append(logits)
            ids.append(int(logits.argmax()))
    new_tokens = ids[len(prompt) :]
    assert len(set(new_tokens)) > 8, new_tokens  # not one token repeated forever
    logits = torch.stack(step_logits)
    top = logits.topk(2, dim=-1).values
    gaps.append((top[:, 0] - top[:, 1]).mean().item())
    spreads.append(logits.std(dim=-1).mean().item())


# --- ensure_tiny_checkpoint ----------------------------------------------------------------

ENSURE_SCRIPT = textwrap.dedent(
    """
    import sys
    from engine.tiny.checkpoint import ensure_tiny_checkpoint
    built = []
    path = ensure_tiny_checkpoint(sys.argv[1], progress=lambda step, done, total: built.append(step))
    print("BUILT" if built else "REUSED", path)
    """
)


def test_concurrent_ensure_builds_once_and_replaces_a_stale_cache(tiny_checkpoint, tmp_path):
    target = tmp_path / "tiny-v1"
    target.mkdir()
    (target / MARKER_FILE).write_text(json.dumps({"fingerprint": "made-by-older-code"}))
    (target / "config.json").write_text("{}")
    crashed = tmp_path / ".tiny-v1.tmp-crashed"  # a build that died half-way
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_SCRIPT, str(target)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(word for word, _ in results) == ["BUILT", "REUSED", "REUSED"]
    assert {path for _, path in results} == {str(target)}
    assert digests(target) == digests(tiny_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-v1.lock", "tiny-v1"]
    assert ensure_tiny_checkpoint(target) == target  # a complete cache is used as it is


def test_ensure_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a tiny checkpoint"):
        ensure_tiny_checkpoint(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "not a checkpoint"
