"""Plugins through real entry points: a distribution installed into a temporary sys.path
entry (a ``*.dist-info`` with ``entry_points.txt``, as pip writes it) is picked up by name."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from cluster.config.output import OutputConfig
from cluster.errors import ConfigError
from cluster.plugins import PLUGIN_GROUPS, PluginRegistry
from engine.output import OutputRequest, RawOutput, build_output_processor
from engine.output.build import default_registry

PLUGIN_MODULE = '''
import re
from engine.output.types import Finding, ParseResult


class ShoutingCheck:
    """Flags words in capitals of at least `min_length` letters."""

    name = "shouting"

    def __init__(self, min_length=4):
        self.pattern = re.compile(r"\\b[A-Z]{%d,}\\b" % min_length)

    def scan(self, text):
        return [Finding(self.name, "tone.shouting", m.start(), m.end()) for m in self.pattern.finditer(text)]


class CsvFormat:
    name = "csv"
    prose = False

    def detect(self, text):
        lines = [l for l in text.strip().splitlines() if l]
        return 0.95 if len(lines) > 1 and len({l.count(",") for l in lines}) == 1 and "," in lines[0] else 0.0

    def parse(self, text):
        return ParseResult([l.split(",") for l in text.strip().splitlines()])

    def validate(self, value, request):
        return [] if all(len(r) == len(value[0]) for r in value) else ["ragged rows"]


class LengthValidator:
    def __init__(self, max_chars):
        self.max_chars = max_chars

    def validate(self, parsed, fmt, finish_reason, request):
        return [] if len(str(parsed.value)) <= self.max_chars else [f"longer than {self.max_chars}"]


class NoScan:
    name = "noscan"


def failing_factory(**options):
    raise RuntimeError("the model file is missing")


an_object = ShoutingCheck()
'''

ENTRY_POINTS = """
[m_ai.safety_checks]
shouting = m_ai_test_plugin:ShoutingCheck
noscan = m_ai_test_plugin:NoScan
failing = m_ai_test_plugin:failing_factory
prebuilt = m_ai_test_plugin:an_object
missing_module = m_ai_no_such_module:Thing

[m_ai.formats]
csv = m_ai_test_plugin:CsvFormat

[m_ai.output_stages]
short_validator = m_ai_test_plugin:LengthValidator

[m_ai.embedders]
tiny = m_ai_test_plugin:ShoutingCheck
"""


def write_dist(root, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The test plugin distribution, importable and discoverable for one test."""
    (tmp_path / "m_ai_test_plugin.py").write_text(PLUGIN_MODULE)
    write_dist(tmp_path, "m_ai_test_plugin", ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("m_ai_test_plugin", None)


def config(**sections) -> OutputConfig:
    return OutputConfig.model_validate(sections)


def test_a_safety_check_plugin_is_found_by_its_entry_point_and_obeys_the_policy(installed):
    processor = build_output_processor(
        config(
            safety={
                "checks": ["pii", {"name": "shouting", "options": {"min_length": 3}}],
                "default_policy": {"actions": {"pii": "redact", "tone": "redact"}},
                "tenants": {"loud": {"actions": {"tone.shouting": "block"}}},
            }
        )
    )
    out = processor.process(RawOutput("I SAID no to a@b.io.", "stop"))
    assert out.text == "I [SHOUTING] no to [EMAIL]."
    loud = processor.process(
        RawOutput("Fine. I SAID no.", "stop", request=OutputRequest(tenant="loud"))
    )
    assert loud.text == "Fine. " and loud.finish_reason == "content_filter"
    assert default_registry().available("m_ai.safety_checks")["shouting"] == (
        "m_ai_test_plugin:ShoutingCheck (m_ai_test_plugin 0.1)"
    )


def test_a_format_plugin_is_detected_parsed_and_validated(installed):
    processor = build_output_processor(config(formats={"plugins": ["csv"]}))
    out = processor.process(RawOutput("a,b\n1,2\n3,4", "stop"))
    assert out.format == "csv" and out.parsed == [["a", "b"], ["1", "2"], ["3", "4"]] and out.valid
    forced = processor.process(RawOutput("a,b\n1", "stop", request=OutputRequest(format="csv")))
    assert forced.format == "csv" and forced.errors == ("ragged rows",)


def test_a_stage_plugin_replaces_its_stage(installed):
    processor = build_output_processor(
        config(stages={"validate": {"name": "short_validator", "options": {"max_chars": 5}}})
    )
    assert processor.process(RawOutput("tiny", "stop")).valid
    assert processor.process(RawOutput("much longer", "stop")).errors == ("longer than 5",)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"safety": {"checks": ["nonexistent"]}},
            "plugin 'nonexistent' is not installed in entry point group 'm_ai.safety_checks'",
        ),
        ({"safety": {"checks": ["noscan"]}}, "has no attribute 'scan'"),
        ({"safety": {"checks": ["failing"]}}, "the model file is missing"),
        ({"safety": {"checks": ["missing_module"]}}, "importing it failed: ModuleNotFoundError"),
        ({"safety": {"checks": [{"name": "prebuilt", "options": {"x": 1}}]}}, "takes no options"),
        (
            {"safety": {"checks": [{"name": "shouting", "options": {"bogus": 1}}]}},
            "unexpected keyword argument",
        ),
        (
            {"stages": {"parse": {"name": "short_validator", "options": {"max_chars": 3}}}},
            "has no attribute 'parse'",
        ),
    ],
)
def test_a_broken_plugin_fails_the_start_with_a_clear_error(installed, section, message):
    with pytest.raises(ConfigError) as err:
        build_output_processor(config(**section))
    assert message in err.value.message
    assert err.value.param.startswith("output.")  # the config field that named it


def test_the_error_names_the_distribution(installed):
    with pytest.raises(ConfigError) as err:
        build_output_processor(config(safety={"checks": ["failing"]}))
    assert (
        "m_ai_test_plugin 0.1" in err.value.message
        and "output.safety.checks[0]" in err.value.message
    )


def test_two_distributions_with_the_same_plugin_name_are_refused(installed):
    write_dist(installed, "other_dist", "[m_ai.safety_checks]\nshouting = other_mod:Check\n")
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="provided twice"):
        build_output_processor(config(safety={"checks": ["shouting"]}))


def test_every_documented_group_is_known_and_others_are_refused(installed):
    registry = PluginRegistry()
    assert set(PLUGIN_GROUPS) == {
        "m_ai.output_stages",
        "m_ai.safety_checks",
        "m_ai.formats",
        "m_ai.memory_backends",
        "m_ai.embedders",
    }
    assert registry.load("m_ai.embedders", "tiny", field="memory.embedder").name == "shouting"
    with pytest.raises(ConfigError, match="not a plugin group"):
        registry.load("m_ai.nope", "x", field="f")


def test_without_the_distribution_the_plugin_is_unknown():
    with pytest.raises(ConfigError, match="known: blocklist, injection, pii"):
        build_output_processor(config(safety={"checks": ["shouting"]}))
