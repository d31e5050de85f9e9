"""``serving.migration``: on by default, and a bad value names the field, the value and the fix."""

from __future__ import annotations

import pytest

from cluster.config import build_app_config
from cluster.errors import ConfigError


def test_migration_is_on_by_default_with_bounds():
    migration = build_app_config({}, "test").serving.migration
    assert migration.enabled and migration.max_tries == 2 and migration.max_tokens == 2048
    assert migration.wait_s == 10.0


@pytest.mark.parametrize("fields, param, words", [
    ({"max_tries": 0}, "max_tries", ["(got 0)", "greater than or equal to 1"]),
    ({"wait_s": 0}, "wait_s", ["(got 0)", "greater than 0"]),
    ({"max_tokens": 0}, "max_tokens", ["max_tokens=0", "max_tokens >= 1", "enabled: false"]),
    ({"max_trys": 3}, "max_trys", ["did you mean `max_tries`"]),
])
def test_bad_values_name_the_field_the_value_and_the_fix(fields, param, words):
    with pytest.raises(ConfigError) as err:
        build_app_config({"serving": {"migration": fields}}, "test")
    assert err.value.param == f"serving.migration.{param}"
    for word in words:
        assert word in err.value.message


def test_migration_may_be_turned_off():
    assert not build_app_config({"serving": {"migration": {"enabled": False, "max_tokens": 0}}}, "t").serving.migration.enabled
