"""The typed config tree: errors that name the field, overlays, variables, save/load, updates."""

from __future__ import annotations

import json

import pydantic
import pytest

from cluster.config import (
    SCHEMA_VERSION,
    AppConfig,
    ModelConfig,
    build_model_config,
    env_overrides,
    load_config,
    plan_update,
    save_config,
)
from cluster.errors import ConfigError


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (dict(model_size="7B", context_length=8192), "context_length", ["8192", "4096", "context_length <= 4096"]),
        (dict(max_tokens=3000), "max_tokens", ["3000", "context_length=2048"]),
        (dict(top_p=0.0), "top_p", ["top_p=0.0", "(0, 1]"]),
        (dict(top_p=1.5), "top_p", ["1.5"]),
        (dict(temperature=-1), "temperature", ["temperature", "-1"]),
        (dict(temperature="hot"), "temperature", ["temperature", "hot"]),
        (dict(model_size="13B", tp_size=3), "tp_size", ["tp_size=3", "40", "use one of"]),
        (dict(quantization="4bit", tp_size=2), "quantization", ["tp_size=2", "tp_size=1"]),
        (dict(max_num_seqs=64, max_batched_tokens=32), "max_batched_tokens", ["64", ">= 64"]),
        (dict(device="cpu", dtype="float16"), "dtype", ["float16", "cpu"]),
        (dict(model_size="30B"), "model_size", ["model_size", "30B"]),
        (dict(name="bad name!"), "name", ["bad name!"]),
        (dict(checkpoint="ftp://x/y"), "checkpoint", ["ftp", "s3"]),
        (dict(tp_sise=2), "tp_sise", ["tp_sise"]),
        (
            dict(model_size="7B", device="cuda", replace_with_kernel_inject=True),
            "replace_with_kernel_inject",
            ["replace_with_kernel_inject=True", "static workspace", "leave replace_with_kernel_inject false"],
        ),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_fix(fields, param, words):
    with pytest.raises(ConfigError) as err:
        build_model_config(**fields)
    assert err.value.param == param
    for word in words:
        assert word in err.value.message


def test_defaults_are_the_tiny_chat_model():
    config = ModelConfig()
    assert config.model_size == "tiny" and config.served_name == "m-ai-tiny"
    assert ModelConfig(model_size="70B", model_variant="base").served_name == "llama-2-70b"
    assert ModelConfig(model_size="7B").served_name == "llama-2-7b-chat"


def test_config_is_frozen():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        ModelConfig().temperature = 0.1


def test_strings_and_paths_are_sanitised(tmp_path):
    config = ModelConfig(name="  my-model  ", checkpoint=f"  {tmp_path}/a/../b  ")
    assert config.name == "my-model"
    assert config.checkpoint == str((tmp_path / "b").resolve())
    assert ModelConfig(checkpoint="s3://bucket/llama").checkpoint == "s3://bucket/llama"


def test_save_and_load_round_trip_yaml_and_json(tmp_path):
    config = AppConfig(models=[ModelConfig(model_size="7B", checkpoint="s3://b/7b", tp_size=2, temperature=0.2)])
    for name in ("m-ai.yaml", "m-ai.json"):
        path = save_config(config, tmp_path / name)
        assert load_config(path) == config
    assert json.loads((tmp_path / "m-ai.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_environment_overlay_then_variables_take_precedence(tmp_path):
    base = tmp_path / "m-ai.yaml"
    base.write_text("models:\n  - model_size: tiny\n    temperature: 0.5\n    top_p: 0.9\n")
    (tmp_path / "m-ai.prod.yaml").write_text("log_format: json\nmodels:\n  - temperature: 0.3\n")
    assert load_config(base).models[0].temperature == 0.5
    prod = load_config(base, env="prod")
    assert prod.log_format == "json" and prod.models[0].temperature == 0.3 and prod.models[0].top_p == 0.9
    environ = {"M_AI_MODELS__0__TEMPERATURE": "0.1", "UNRELATED": "x"}
    assert load_config(base, env="prod", environ=environ).models[0].temperature == 0.1
    # variables are read only when the caller passes them
    assert load_config(base, env="prod").models[0].temperature == 0.3


def test_bad_variable_value_names_the_field(tmp_path):
    base = tmp_path / "m-ai.yaml"
    base.write_text("models:\n  - model_size: tiny\n")
    with pytest.raises(ConfigError) as err:
        load_config(base, environ={"M_AI_MODELS__0__TOP_P": "7"})
    assert "top_p" in err.value.message and "M_AI_ variables" in err.value.message


def test_env_overrides_parse_nested_paths_and_values():
    assert env_overrides({"M_AI_MODELS__1__TP_SIZE": "2", "M_AI_LOG_LEVEL": "DEBUG"}) == {
        "log_level": "DEBUG",
        "models": [{}, {"tp_size": 2}],
    }


def test_unknown_environment_and_unreadable_files_are_clear(tmp_path):
    base = tmp_path / "m-ai.yaml"
    base.write_text("models: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(base)
    base.write_text("{}")
    with pytest.raises(ConfigError, match="env='qa' is unknown"):
        load_config(base, env="qa")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "m-ai.yaml"
    path.write_text(f"schema_version: {SCHEMA_VERSION + 1}\n")
    with pytest.raises(ConfigError, match="upgrade M-AI"):
        load_config(path)


def test_duplicate_model_names_are_refused():
    with pytest.raises(ConfigError, match="appear twice"):
        from cluster.config import build_app_config

        build_app_config({"models": [{"model_size": "tiny"}, {"model_size": "tiny"}]})


def test_update_sorts_live_and_reload_fields():
    current = ModelConfig()
    update = plan_update(current, {"temperature": 0.1, "max_tokens": 64, "tp_size": 2, "top_p": 1.0})
    assert update.live == ("temperature", "max_tokens")
    assert update.reload == ("tp_size",)
    assert update.needs_reload and update.config.temperature == 0.1
    assert not plan_update(current, {"seed": 7}).needs_reload


def test_update_validates_and_names_unknown_fields():
    with pytest.raises(ConfigError) as err:
        plan_update(ModelConfig(), {"temprature": 0.1})
    assert err.value.param == "temprature"
    with pytest.raises(ConfigError) as err:
        plan_update(ModelConfig(), {"top_p": 2})
    assert err.value.param == "top_p"
