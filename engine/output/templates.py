"""Template-based formatting: Jinja2 templates named in config render the finished output.

Templates are compiled when the processor is built (a syntax error fails the start) in a
sandboxed environment (a template cannot reach Python internals through the model's text)
with ``StrictUndefined`` (a misspelt variable is an error, not an empty string). They see:
``text`` (the processed text), ``format``, ``parsed`` (the parsed value: JSON data, or
``{"code_blocks": [...]}`` for markdown), ``code_blocks``, ``finish_reason``, ``valid``,
``errors`` and ``summary``. A stream whose request names a template sends nothing until the
end, then the rendered text (what was sent is never taken back).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.errors import ConfigError, InvalidRequestError
from engine.output.types import ProcessedOutput


class TemplateRenderer:
    def __init__(self, templates: Mapping[str, str]) -> None:
        self._compiled: dict[str, Any] = {}
        if not templates:
            return
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
        )
        for name, source in templates.items():
            try:
                self._compiled[name] = env.from_string(source)
            except TemplateSyntaxError as exc:
                raise ConfigError(
                    f"output.formats.templates.{name}: Jinja2 syntax error at line {exc.lineno}: "
                    f"{exc.message}; fix the template",
                    param=f"output.formats.templates.{name}",
                ) from exc

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._compiled)

    def check(self, name: str) -> None:
        if name not in self._compiled:
            known = ", ".join(self._compiled) or "none are configured"
            raise InvalidRequestError(
                f"template={name!r} is not a configured output template ({known})", param="template"
            )

    def render(self, name: str, output: ProcessedOutput) -> str:
        self.check(name)
        from jinja2 import TemplateError

        try:
            return self._compiled[name].render(
                text=output.text,
                format=output.format,
                parsed=output.parsed,
                code_blocks=[
                    {"language": b.language, "code": b.code, "closed": b.closed}
                    for b in output.code_blocks
                ],
                finish_reason=output.finish_reason,
                valid=output.valid,
                errors=list(output.errors),
                summary=output.summary,
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                f"output template {name!r} failed on this output: {exc}; fix the template or the "
                "request's format",
                param="template",
            ) from exc
