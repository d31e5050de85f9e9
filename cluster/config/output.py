"""The typed configuration of output processing: pipeline stages, safety policies, formats.

``OutputConfig`` is meant to become the ``output`` section of ``AppConfig``; the ingress
builds one ``engine.output.OutputProcessor`` from it at start
(``engine.output.build.build_output_processor``). Pure data, frozen, no engine import.

Plugins are named here (``PluginRef``): a built-in name or an entry point of the group
the field documents (cluster/plugins.py).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SafetyAction = Literal["allow", "redact", "block"]
BUILTIN_CHECKS = ("pii", "blocklist", "injection")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CATEGORY_RE = re.compile(r"^[a-z0-9_]+(?:\.[a-z0-9_]+)*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class PluginRef(_Frozen):
    """A built-in or an installed plugin, and the options its factory is called with."""

    name: str = Field(description="Built-in name or entry point name.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of its factory."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"name={value!r} is not a plugin name; use 1-64 letters, digits and . _ -"
            )
        return value


def _plugin_ref(value: Any) -> Any:
    """Accept a bare name for a plugin without options."""
    return {"name": value} if isinstance(value, str) else value


class OutputStagesConfig(_Frozen):
    """Replacements for pipeline stages (entry point group ``m_ai.output_stages``); None
    keeps the built-in stage."""

    sanitize: PluginRef | None = None
    detect_format: PluginRef | None = None
    parse: PluginRef | None = None
    validate_: PluginRef | None = Field(None, alias="validate")
    post_process: PluginRef | None = None
    summarizer: PluginRef | None = Field(None, description="`summarize(text, max_chars) -> str`.")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return _plugin_ref(value)


class SanitizeConfig(_Frozen):
    fragments: tuple[str, ...] = Field(
        ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
        description="Special tokens and chat-template fragments removed from the output.",
    )
    stop_sequences: tuple[str, ...] = Field(
        (), description="Stop sequences applied to every output."
    )
    remove_unsafe_chars: bool = Field(
        True, description="Control, bidi-override and zero-width characters."
    )
    remove_replacement_char: bool = Field(True, description="U+FFFD left by invalid UTF-8.")
    max_output_chars: int | None = Field(
        None, ge=1, description="Cut longer outputs (finish_reason=length); None: no limit."
    )

    @field_validator("fragments", "stop_sequences")
    @classmethod
    def _no_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("an empty string is listed; remove it")
        return value


class SafetyPolicyConfig(_Frozen):
    """What one tenant's output may contain."""

    actions: dict[str, SafetyAction] = Field(
        # Off unless an operator asks: a check on the stream holds text back to sentence
        # boundaries, which costs every client its token-by-token streaming.
        default_factory=dict,
        description="Category (or dotted prefix: `pii` covers `pii.email`) -> allow, redact or block.",
    )
    default_action: SafetyAction = Field(
        "allow", description="For categories not listed (a plugin's)."
    )
    blocklist: tuple[str, ...] = Field(
        (), description="Terms blocked for this tenant, besides the global ones."
    )
    redaction: str = Field(
        "[{label}]", description="Replacement; `{label}` is e.g. EMAIL, `{category}` pii.email."
    )

    @field_validator("actions")
    @classmethod
    def _check_categories(cls, value: dict[str, str]) -> dict[str, str]:
        for category in value:
            if not _CATEGORY_RE.match(category):
                raise ValueError(
                    f"actions: category {category!r} is not dotted lowercase words (e.g. pii, pii.email)"
                )
        return value

    @field_validator("redaction")
    @classmethod
    def _check_redaction(cls, value: str) -> str:
        try:
            value.format(label="EMAIL", category="pii.email")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"redaction={value!r} is not a valid template ({exc}); use {{label}} and {{category}} only"
            ) from None
        return value

    @field_validator("blocklist")
    @classmethod
    def _check_terms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _checked_terms(value, "blocklist")


def _checked_terms(terms: tuple[str, ...], field: str) -> tuple[str, ...]:
    for term in terms:
        if not term.strip():
            raise ValueError(f"{field}: an empty term is listed; remove it")
        if "\n" in term or re.search(r"[.!?]\s", term):
            raise ValueError(
                f"{field}: term {term!r} spans a line or sentence end, which safety checks never see "
                "at once; split it into separate terms"
            )
    return terms


class SafetyConfig(_Frozen):
    enabled: bool = Field(True, description="False: no check runs (every tenant).")
    checks: tuple[PluginRef, ...] = Field(
        tuple(PluginRef(name=n) for n in BUILTIN_CHECKS),
        description=f"Checks to run: built-ins ({', '.join(BUILTIN_CHECKS)}) or plugins (`m_ai.safety_checks`).",
    )
    blocklist: tuple[str, ...] = Field(
        (), description="Terms blocked for every tenant (category `blocklist`)."
    )
    injection_markers: tuple[str, ...] | None = Field(
        None,
        description="Regular expressions of prompt-injection markers; None: the built-in list.",
    )
    default_policy: SafetyPolicyConfig = Field(
        default_factory=SafetyPolicyConfig, description="For tenants without their own policy."
    )
    tenants: dict[str, SafetyPolicyConfig] = Field(
        default_factory=dict, description="Tenant -> policy."
    )
    segment_chars: int = Field(
        240,
        ge=16,
        le=4000,
        description="Stream segments longer than this are cut at the next safe space.",
    )

    @field_validator("checks", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return tuple(_plugin_ref(v) for v in value) if isinstance(value, (list, tuple)) else value

    @field_validator("blocklist")
    @classmethod
    def _check_terms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _checked_terms(value, "blocklist")

    @field_validator("injection_markers")
    @classmethod
    def _check_markers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for marker in value or ():
            try:
                pattern = re.compile(marker)
            except re.error as exc:
                raise ValueError(
                    f"injection_markers: {marker!r} is not a regular expression ({exc})"
                ) from None
            if pattern.match(""):
                raise ValueError(
                    f"injection_markers: {marker!r} matches the empty string; make it specific"
                )
        return value

    @field_validator("tenants")
    @classmethod
    def _check_tenants(cls, value: dict[str, SafetyPolicyConfig]) -> dict[str, SafetyPolicyConfig]:
        for tenant in value:
            if not _NAME_RE.match(tenant):
                raise ValueError(
                    f"tenants: {tenant!r} is not a tenant name; use 1-64 letters, digits and . _ -"
                )
        return value

    @model_validator(mode="after")
    def _unique_checks(self) -> SafetyConfig:
        names = [c.name for c in self.checks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"checks: {dupes} listed twice; list each check once")
        return self

    def policy_for(self, tenant: str) -> SafetyPolicyConfig:
        return self.tenants.get(tenant, self.default_policy)


class TemplateConfig(_Frozen):
    """A Jinja2 template, inline (``source``) or in a file (``path``)."""

    source: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TemplateConfig:
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of `source` (the template text) and `path` (a file)")
        return self


class FormatsConfig(_Frozen):
    plugins: tuple[PluginRef, ...] = Field((), description="Custom formats (`m_ai.formats`).")
    templates: dict[str, TemplateConfig] = Field(
        default_factory=dict, description="Name -> Jinja2 template a request may ask for."
    )
    normalize_markdown: bool = Field(
        False, description="Close code fences, `-` bullets, renumber lists."
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return tuple(_plugin_ref(v) for v in value) if isinstance(value, (list, tuple)) else value

    @field_validator("templates", mode="before")
    @classmethod
    def _inline(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"source": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("templates")
    @classmethod
    def _check_names(cls, value: dict[str, TemplateConfig]) -> dict[str, TemplateConfig]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"templates: {name!r} is not a template name; use letters, digits and . _ -"
                )
        return value


class PostProcessConfig(_Frozen):
    dedup: bool = Field(
        False, description="Drop repeated sentences and paragraphs (not in code or JSON)."
    )
    dedup_min_chars: int = Field(24, ge=1, description='Shorter sentences may repeat ("Yes.").')
    summarize_over_chars: int | None = Field(
        None, ge=1, description="Outputs longer than this get a `summary`; None: never."
    )
    summary_chars: int = Field(600, ge=16, description="Length of that summary at most.")
    metrics: bool = Field(True, description="Quality metrics per response.")

    @model_validator(mode="after")
    def _summary_shorter(self) -> PostProcessConfig:
        if (
            self.summarize_over_chars is not None
            and self.summary_chars >= self.summarize_over_chars
        ):
            raise ValueError(
                f"summary_chars={self.summary_chars} is not below summarize_over_chars="
                f"{self.summarize_over_chars}; a summary must be shorter than what it summarizes"
            )
        return self


class OutputConfig(_Frozen):
    """The ``output`` section: how model output is processed before clients see it."""

    enabled: bool = Field(True, description="False: clients get the engine's text unprocessed.")
    stages: OutputStagesConfig = Field(default_factory=OutputStagesConfig)
    sanitize: SanitizeConfig = Field(default_factory=SanitizeConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    formats: FormatsConfig = Field(default_factory=FormatsConfig)
    post_process: PostProcessConfig = Field(default_factory=PostProcessConfig)
