"""The whole output pipeline switched on (the defaults keep streaming token by token)."""

from __future__ import annotations

from typing import Any

from cluster.config import deep_merge
from cluster.config.output import OutputConfig

FULL: dict[str, Any] = {
    "safety": {"default_policy": {"actions": {"pii": "redact", "blocklist": "block", "injection": "redact"}}},
    "formats": {"normalize_markdown": True},
    "post_process": {"dedup": True},
}


def full_output_config(**sections: Any) -> OutputConfig:
    return OutputConfig.model_validate(deep_merge(FULL, sections))
