"""The HTTP API fuzzed from its own OpenAPI spec (schemathesis, property-based): whatever the
generated input, valid or not, the answer is never a server error, and its status code,
content type and body match what the spec declares.

Inputs come in both of schemathesis's modes: positive (valid per the schema) and negative
(violating it). The budget is fixed and the generation derandomized (``EXAMPLES`` per
operation, the same inputs on every run), so the test costs the same few seconds each time.
The app runs the fake engine at full speed and without API keys, so generated requests reach
every layer (with keys, nearly all of them would stop at the 401).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.serve_harness import app_config

EXAMPLES = 20
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
)


@pytest.fixture(scope="module")
def fuzz_app(serve_cluster):
    deployed = serve_cluster.deploy(
        app_config(),
        prefix="fuzz",
        engine_options={"tokens_per_s": 0, "tokenizer": "bytes"},  # 0: no pacing
    )
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    loaded = schemathesis.openapi.from_url(f"{fuzz_app.url}/openapi.json")
    loaded.config.update(base_url=fuzz_app.url)
    return loaded


def call(client: httpx.Client, case) -> httpx.Response:
    """Send ``case`` with httpx. (schemathesis's own ``requests`` transport inspects urllib3
    internals that urllib3-future, pulled in by grafana-client through niquests, replaces.)"""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url).rstrip("/"))
    data = kwargs.get("data")
    return client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        cookies=kwargs.get("cookies"),
        json=kwargs.get("json"),
        content=data if isinstance(data, (bytes, str)) else None,
        data=data if isinstance(data, dict) else None,
    )


def fuzz_operation(client: httpx.Client, operation) -> None:
    """``EXAMPLES`` generated calls of one operation (raises on the first failing check)."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode)))
    def run(case) -> None:
        response = call(client, case)
        case.validate_response(response, checks=CHECKS)
        assert "Traceback" not in response.text, response.text[:300]

    run()


def test_the_api_answers_any_input_as_its_spec_says(fuzz_app, api_schema):
    # schemathesis's own pytest loader needs a pytest internal that pytest 9 renamed, so
    # each operation is driven through hypothesis here.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    failures = {}
    with httpx.Client(base_url=fuzz_app.url, timeout=30) as client:
        for operation in operations:
            try:
                fuzz_operation(client, operation)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a FailureGroup too: report every failing operation
                failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
