"""Builds the ``OutputProcessor`` of a server from ``cluster.config.output.OutputConfig``.

Every plugin the config names is loaded and checked here, once, at start: a missing or
broken plugin, a template with a syntax error or an unreadable template file raises
``ConfigError`` before the server takes a request.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config.output import OutputConfig, SafetyPolicyConfig
from cluster.errors import ConfigError
from cluster.plugins import PluginRegistry
from engine.output.formats import FormatDetector, FormatParser, FormatRegistry, FormatValidator
from engine.output.pipeline import OutputProcessor, OutputStages
from engine.output.postprocess import PostProcessor
from engine.output.safety import BlocklistCheck, InjectionCheck, PiiCheck, SafetyGuard, SafetyPolicy
from engine.output.sanitize import Sanitizer
from engine.output.templates import TemplateRenderer
from engine.output.types import SafetyCheck

STAGE_GROUP = "m_ai.output_stages"
SAFETY_GROUP = "m_ai.safety_checks"
FORMAT_GROUP = "m_ai.formats"

# What a replacement must implement in each slot (the protocols of engine/output/types.py).
STAGE_INTERFACES: dict[str, tuple[str, ...]] = {
    "sanitize": ("open", "verify_length"),
    "detect_format": ("detect",),
    "parse": ("parse",),
    "validate": ("validate",),
    "post_process": ("open", "finalize"),
    "summarizer": ("summarize",),
}


def default_registry() -> PluginRegistry:
    """A registry with the built-in safety checks; plugins come from entry points."""
    registry = PluginRegistry()
    registry.register(SAFETY_GROUP, "pii", PiiCheck)
    registry.register(SAFETY_GROUP, "injection", InjectionCheck)
    # without options, `blocklist` is built per tenant from the configured terms (_guards)
    registry.register(SAFETY_GROUP, "blocklist", BlocklistCheck)
    return registry


def build_output_processor(
    config: OutputConfig | None = None, registry: PluginRegistry | None = None
) -> OutputProcessor:
    config = config or OutputConfig()
    registry = registry or default_registry()
    formats = FormatRegistry(
        registry.load(FORMAT_GROUP, ref.name, ref.options, field=f"output.formats.plugins[{i}]")
        for i, ref in enumerate(config.formats.plugins)
    )
    stages = _stages(config, registry, formats)
    default_guard, guards = _guards(config, registry)
    return OutputProcessor(
        stages,
        formats=formats,
        guards=guards,
        default_guard=default_guard,
        templates=TemplateRenderer(_template_sources(config)),
        segment_chars=config.safety.segment_chars,
    )


def _stage(config: OutputConfig, registry: PluginRegistry, slot: str, default):
    ref = getattr(config.stages, "validate_" if slot == "validate" else slot)
    if ref is None:
        return default
    return registry.load(
        STAGE_GROUP,
        ref.name,
        ref.options,
        field=f"output.stages.{slot}",
        required=STAGE_INTERFACES[slot],
    )


def _stages(
    config: OutputConfig, registry: PluginRegistry, formats: FormatRegistry
) -> OutputStages:
    s, p = config.sanitize, config.post_process
    summarizer = _stage(config, registry, "summarizer", None)
    return OutputStages(
        sanitize=_stage(
            config,
            registry,
            "sanitize",
            Sanitizer(
                fragments=s.fragments,
                stop_sequences=s.stop_sequences,
                remove_unsafe_chars=s.remove_unsafe_chars,
                remove_replacement_char=s.remove_replacement_char,
                max_chars=s.max_output_chars,
            ),
        ),
        detect_format=_stage(config, registry, "detect_format", FormatDetector(formats)),
        parse=_stage(config, registry, "parse", FormatParser(formats)),
        validate=_stage(config, registry, "validate", FormatValidator(formats)),
        post_process=_stage(
            config,
            registry,
            "post_process",
            PostProcessor(
                dedup=p.dedup,
                dedup_min_chars=p.dedup_min_chars,
                normalize_markdown=config.formats.normalize_markdown,
                summarize_over_chars=p.summarize_over_chars,
                summary_chars=p.summary_chars,
                summarizer=summarizer,
                metrics=p.metrics,
            ),
        ),
    )


def _guards(
    config: OutputConfig, registry: PluginRegistry
) -> tuple[SafetyGuard, dict[str, SafetyGuard]]:
    safety = config.safety
    if not safety.enabled:
        return SafetyGuard((), SafetyPolicy({})), {}
    shared: list[SafetyCheck] = []
    with_blocklist = False
    for i, ref in enumerate(safety.checks):
        field = f"output.safety.checks[{i}]"
        if ref.name == "blocklist" and not ref.options:
            with_blocklist = True
            continue
        options = dict(ref.options)
        if (
            ref.name == "injection"
            and "markers" not in options
            and safety.injection_markers is not None
        ):
            options["markers"] = safety.injection_markers
        shared.append(registry.load(SAFETY_GROUP, ref.name, options, field=field))

    def guard(policy: SafetyPolicyConfig) -> SafetyGuard:
        checks = list(shared)
        if with_blocklist:
            checks.append(BlocklistCheck((*safety.blocklist, *policy.blocklist)))
        return SafetyGuard(
            checks, SafetyPolicy(dict(policy.actions), policy.default_action, policy.redaction)
        )

    return guard(safety.default_policy), {tenant: guard(p) for tenant, p in safety.tenants.items()}


def _template_sources(config: OutputConfig) -> dict[str, str]:
    sources: dict[str, str] = {}
    for name, template in config.formats.templates.items():
        if template.source is not None:
            sources[name] = template.source
            continue
        path = Path(template.path).expanduser()
        try:
            sources[name] = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"output.formats.templates.{name}.path={template.path!r} cannot be read ({exc.strerror}); "
                "give an existing file or an inline `source`",
                param=f"output.formats.templates.{name}.path",
            ) from exc
    return sources
