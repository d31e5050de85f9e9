"""The typed configuration tree of M-AI.

One source of truth, pydantic and frozen: ``ModelConfig`` describes one served model (what
to load, how to split it over ranks, sampling defaults); ``AppConfig`` is the whole file. Every
validation error names the field, the value and the fix.

Precedence when loading, lowest first (documented in docs/configuration.md):
1. field defaults; 2. the base file; 3. the environment overlay ``<base>.<env>.yaml`` when an
environment (dev, staging, prod) is named; 4. ``M_AI_...`` variables, only when the caller
passes an environment mapping explicitly (the CLI does, and logs every override it applies).
"""


from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.config.memory import MemoryConfig
from cluster.config.model import ModelConfig, _Frozen, config_error
from cluster.config.output import OutputConfig
from cluster.config.serving import ServingConfig
from cluster.errors import ConfigError

SCHEMA_VERSION = 1
ENV_PREFIX = "M_AI_"
ENVIRONMENTS = ("dev", "staging", "prod")


class AppConfig(_Frozen):
    """The whole configuration file."""

    schema_version: int = Field(SCHEMA_VERSION, description="Format version of this file.")
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()], description="Served models (one deployment each)."
    )
    log_format: Literal["text", "json"] = Field("text", description="`json` in production.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="HTTP endpoint, API keys, replicas, streaming."
    )
    output: OutputConfig = Field(
        default_factory=OutputConfig,
        description="Output processing: sanitizing, content safety per tenant, formats, plugins "
        "(docs/output.md).",
    )
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig,
        description="Server-side conversation memory per tenant and user: window, summaries, "
        "long-term facts (docs/memory.md); `enabled: false` turns it off.",
    )

    @field_validator("schema_version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version={value} is newer than this M-AI understands ({SCHEMA_VERSION}); upgrade M-AI"
            )
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: names {dupes} appear twice; give each model a distinct `name`")
        if not self.models:
            raise ValueError("models is empty; configure at least one model")
        return self

    @field_validator("memory")
    @classmethod
    def _memory_without_model(cls, value: MemoryConfig) -> MemoryConfig:
        # The app's memory actors get no handle to the served model: a `model` extractor or
        # summarizer would fail when the actors start, so the config refuses it up front.
        for name, fix in (("extractor", "rules"), ("summarizer", "extractive")):
            if getattr(value, name) == "model":
                raise ValueError(
                    f"{name}='model' is not supported in a served app (its memory actors have no "
                    f"handle to the served model); use memory.{name}: {fix}"
                )
        return value

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.served_name == name:
                return m
        raise KeyError(name)


def build_app_config(data: dict[str, Any], source: str = "config") -> AppConfig:
    try:
        return AppConfig.model_validate(migrate(data))
    except ValidationError as exc:
        raise config_error(exc, source, AppConfig) from None


# -- migration, save and load ---------------------------------------------------------------

# schema_version -> function upgrading a dict of that version to the next one.
MIGRATIONS: dict[int, Any] = {}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade an older file's dict to ``SCHEMA_VERSION`` through ``MIGRATIONS``."""
    data = dict(data)
    version = int(data.get("schema_version", SCHEMA_VERSION))
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["schema_version"] = version
    return data


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``; mappings merge, lists of models merge by position."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list) and all(
            isinstance(v, dict) for v in value + out[key]
        ):
            merged = [deep_merge(b, o) for b, o in zip(out[key], value)]
            out[key] = merged + out[key][len(value):] + value[len(out[key]):]
        else:
            out[key] = value
    return out


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Nested overrides from ``M_AI_A__B__0__C=value`` variables (values parsed as YAML).

    ``M_AI_MODELS__0__TEMPERATURE=0.2`` sets ``models[0].temperature``; ``M_AI_LOG_FORMAT=json``
    sets ``log_format``. Path segments are lower-cased; digits index lists.
    """
    out: dict[str, Any] = {}
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}ENV":
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        value = yaml.safe_load(environ[key]) if environ[key] != "" else ""
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append({})
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
                continue
            if last:
                node[part] = value
            else:
                nxt = parts[i + 1]
                node = node.setdefault(part, [] if nxt.isdigit() else {})
    return out


def load_config(
    path: str | Path | None = None,
    *,
    env: str | None = None,
    environ: dict[str, str] | None = None,
) -> AppConfig:
    """Load ``path`` (YAML or JSON), its ``env`` overlay, then explicit ``M_AI_`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        data = _read_mapping(path)
        source = str(path)
        if env is not None:
            if env not in ENVIRONMENTS:
                raise ConfigError(f"env={env!r} is unknown; use one of {', '.join(ENVIRONMENTS)}", param="env")
            overlay = path.with_name(f"{path.stem}.{env}{path.suffix}")
            if overlay.exists():
                data = deep_merge(data, _read_mapping(overlay))
                source += f" + {overlay.name}"
    if environ is not None:
        overrides = env_overrides(environ)
        if overrides:
            data = deep_merge(data, overrides)
            source += " + M_AI_ variables"
    return build_app_config(data, source)


def save_config(config: AppConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML (``.yaml``/``.yml``) or JSON (``.json``), schema version included."""
    path = Path(path)
    data = config.model_dump(mode="json", exclude_none=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
