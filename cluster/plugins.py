"""Plugins: one mechanism for the whole project, Python entry points.

A plugin is a package that declares an entry point in one of the groups below, e.g. in its
``pyproject.toml``::

    [project.entry-points."m_ai.safety_checks"]
    toxicity = "my_pkg.checks:ToxicityCheck"

and is turned on by naming it in the config (``output.safety.checks: [{name: toxicity,
options: {threshold: 0.8}}]``). Plugins are loaded when the server starts, never per
request: the entry point is imported, a class or function is called with the configured
``options`` (anything else is used as it is and takes no options), and the object is
checked against its group's interface. Any failure — no such plugin, an import error, a
factory that raises, a missing method — stops the start with a ``ConfigError`` that names
the config field, the group, the plugin, the distribution that provides it and the cause.

Built-in implementations are registered in the same registry (``PluginRegistry.register``),
so that the config names a built-in and a plugin the same way.
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.errors import ConfigError
from cluster.logging_setup import get_logger

log = get_logger("cluster.plugins")


@dataclass(frozen=True)
class PluginGroup:
    """An entry point group and the interface its objects must have."""

    name: str
    description: str
    required: tuple[str, ...]  # attributes the loaded object must have (methods callable)


PLUGIN_GROUPS: dict[str, PluginGroup] = {
    group.name: group
    for group in (
        PluginGroup(
            "m_ai.output_stages",
            "a replacement for one stage of the output pipeline (sanitize, detect_format, parse, "
            "validate, post_process) or its summarizer; the interface is the stage's protocol in "
            "engine/output/types.py",
            (),  # checked per stage slot (engine.output.build.STAGE_INTERFACES)
        ),
        PluginGroup(
            "m_ai.safety_checks",
            "a content safety check: `name`, `scan(text) -> [Finding]`",
            ("name", "scan"),
        ),
        PluginGroup(
            "m_ai.formats",
            "an output format: `name`, `prose`, `detect(text)`, `parse(text)`, `validate(value, request)`",
            ("name", "prose", "detect", "parse", "validate"),
        ),
        PluginGroup("m_ai.memory_backends", "a storage backend of the conversation memory", ()),
        PluginGroup("m_ai.embedders", "a text embedder of the conversation memory", ()),
    )
}


def check_interface(obj: Any, required: Iterable[str], what: str) -> None:
    """Raise ``TypeError`` naming the first attribute ``obj`` lacks (or is not callable)."""
    for attr in required:
        if not hasattr(obj, attr):
            raise TypeError(f"{what} has no attribute {attr!r}")
        value = getattr(obj, attr)
        if attr in ("name", "prose"):
            continue
        if not callable(value):
            raise TypeError(f"{what}.{attr} is not callable")


def instantiate(target: Any, options: Mapping[str, Any]) -> Any:
    """A class or function is called with ``options``; any other object is used as is."""
    if inspect.isclass(target) or inspect.isfunction(target):
        return target(**options)
    if options:
        raise TypeError(f"{target!r} is an object, not a factory: it takes no options")
    return target


class PluginRegistry:
    """Resolves ``(group, name)`` to an object: a registered built-in, else an entry point."""

    def __init__(
        self, entry_points: Callable[[str], Iterable[metadata.EntryPoint]] | None = None
    ) -> None:
        self._builtins: dict[str, dict[str, Any]] = {group: {} for group in PLUGIN_GROUPS}
        self._entry_points = entry_points or (lambda group: metadata.entry_points(group=group))

    def register(self, group: str, name: str, target: Any) -> None:
        """A built-in (a class, a function or an object), named like a plugin."""
        self._group(group, field=group)
        self._builtins[group][name] = target

    def available(self, group: str) -> dict[str, str]:
        """Name -> where it comes from (``builtin`` or ``module:attr (dist version)``)."""
        self._group(group, field=group)
        found = {name: "builtin" for name in self._builtins[group]}
        for ep in self._entry_points(group):
            found.setdefault(ep.name, f"{ep.value} ({_dist(ep)})")
        return found

    def load(
        self,
        group: str,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        field: str,
        required: Iterable[str] | None = None,
    ) -> Any:
        """The plugin ``name`` of ``group``, built with ``options`` and checked.

        ``field`` is the config field that named it (for the error message); ``required``
        overrides the group's interface (stage slots have one each).
        """
        spec = self._group(group, field=field)
        options = dict(options or {})
        interface = tuple(spec.required if required is None else required)
        source = "builtin"
        target = self._builtins[group].get(name)
        if target is None:
            entry = self._find(group, name, field)
            source = f"entry point {entry.value!r} of {_dist(entry)}"
            try:
                target = entry.load()
            except Exception as exc:
                raise self._error(
                    field,
                    group,
                    name,
                    source,
                    f"importing it failed: {type(exc).__name__}: {exc}",
                    "fix or reinstall the package",
                ) from exc
        try:
            obj = instantiate(target, options)
        except Exception as exc:
            raise self._error(
                field,
                group,
                name,
                source,
                f"creating it with options {options} failed: {type(exc).__name__}: {exc}",
                "check the plugin's options in the config",
            ) from exc
        try:
            check_interface(obj, interface, f"plugin {name!r}")
        except TypeError as exc:
            raise self._error(
                field,
                group,
                name,
                source,
                str(exc),
                f"implement {', '.join(interface)} ({spec.description})",
            ) from exc
        log.info("plugin loaded", extra={"group": group, "plugin": name, "source": source})
        return obj

    def _find(self, group: str, name: str, field: str) -> metadata.EntryPoint:
        matches = [ep for ep in self._entry_points(group) if ep.name == name]
        if not matches:
            known = ", ".join(sorted(self.available(group))) or "none installed"
            raise ConfigError(
                f"{field}: plugin {name!r} is not installed in entry point group {group!r} (known: "
                f"{known}); install the package that provides it or fix the name",
                param=field,
            )
        if len({ep.value for ep in matches}) > 1:
            where = "; ".join(f"{ep.value} ({_dist(ep)})" for ep in matches)
            raise ConfigError(
                f"{field}: plugin {name!r} of group {group!r} is provided twice ({where}); uninstall one",
                param=field,
            )
        return matches[0]

    @staticmethod
    def _group(group: str, *, field: str) -> PluginGroup:
        spec = PLUGIN_GROUPS.get(group)
        if spec is None:
            raise ConfigError(
                f"{field}: {group!r} is not a plugin group; use one of {', '.join(PLUGIN_GROUPS)}",
                param=field,
            )
        return spec

    @staticmethod
    def _error(field: str, group: str, name: str, source: str, cause: str, fix: str) -> ConfigError:
        return ConfigError(
            f"{field}: plugin {name!r} ({group}, {source}) is broken: {cause}; {fix}", param=field
        )


def _dist(entry: metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"
