"""The typed configuration tree of M-AI: one served model (``model``), the whole file
(``app``), and its branches (``serving``, ``memory``, ``output``). This face re-exports the
names callers use most, so ``from cluster.config import ModelConfig`` keeps working."""

from cluster.catalog import LLAMA2_ARCHITECTURES
from cluster.config.app import (
    SCHEMA_VERSION,
    AppConfig,
    build_app_config,
    deep_merge,
    env_overrides,
    load_config,
    save_config,
)
from cluster.config.model import (
    LIVE_FIELDS,
    ConfigUpdate,
    ModelConfig,
    build_model_config,
    config_error,
    plan_update,
)

__all__ = [
    "SCHEMA_VERSION",
    "LIVE_FIELDS",
    "LLAMA2_ARCHITECTURES",
    "ModelConfig",
    "AppConfig",
    "ConfigUpdate",
    "build_model_config",
    "config_error",
    "build_app_config",
    "load_config",
    "save_config",
    "plan_update",
    "env_overrides",
    "deep_merge",
]
