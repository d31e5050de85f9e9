"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Git-ignored; reused across test runs, rebuilt when the checkpoint's generator code changes.
TEST_CACHE_DIR = REPO_ROOT / ".cache"


@pytest.fixture(scope="session")
def serve_cluster():
    """The session's one local Ray + Serve, shared by every folder (tests/support/serve_harness.py)."""
    from tests.support import serve_harness

    cluster = serve_harness.acquire()
    yield cluster
    serve_harness.release()


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The tiny Llama 2 checkpoint directory (built once, ~5 s, then reused)."""
    from engine.tiny.checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(TEST_CACHE_DIR / "checkpoints" / "tiny-v1")
