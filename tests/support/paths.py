"""Where the repository is, for tests that read its files (docs, configs, benchmarks)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
