"""The HTTP API fuzzed from its own OpenAPI spec (schemathesis, property-based) against the
live app on the real engine (the tiny Llama 2 checkpoint): whatever the generated input, valid
or not, every one of schemathesis's checks passes (``CHECKS``: all of them, as
``--checks all`` runs them): never a server error; status codes, content types, headers and
bodies as the spec declares; valid data accepted, invalid data rejected; ``Allow`` on 405;
a deleted resource gone; no other tenant's data reachable.

Inputs come in both of schemathesis's modes: positive (valid per the schema) and negative
(violating it). The budget is fixed and the generation derandomized (``EXAMPLES`` per
operation, the same inputs on every run). The model's window is small (``context_length``)
so a generated ``max_tokens`` never asks for minutes of decoding; a request over that window
(and the two other refusals no schema can state: ``over_context``) is the schema-valid input
refused by design. The app runs without API
keys, so generated requests reach every layer (with keys, nearly all would stop at the 401).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS as CHECK_REGISTRY
from schemathesis.checks import load_all_checks, positive_data_acceptance

from tests.support.serve_harness import app_config

EXAMPLES = 12
load_all_checks()
CHECKS = tuple(CHECK_REGISTRY.get_all())


@pytest.fixture(scope="module")
def fuzz_app(serve_cluster):
    config = app_config(
        models=[{"tp_size": 1, "max_num_seqs": 8, "context_length": 256, "max_tokens": 16}]
    )
    deployed = serve_cluster.deploy(config, prefix="fuzz", engine_cls=None)  # the real engine
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    loaded = schemathesis.openapi.from_url(f"{fuzz_app.url}/openapi.json")
    loaded.config.update(base_url=fuzz_app.url)
    return loaded


def over_context(response: httpx.Response) -> bool:
    """A 400 for what no OpenAPI schema can state, refused as OpenAI and vLLM refuse it:
    prompt + ``max_tokens`` past the model's context length (the window depends on the model
    and on the prompt's tokens), prompt token ids outside the model's vocabulary, a
    ``json_schema.schema`` that is no JSON Schema the grammar compiler takes, or
    ``max_tokens`` and ``max_completion_tokens`` both given and different, or
    ``stream_options`` without ``stream: true``, a tool message without content, ``best_of``
    other than ``n`` (rules between two fields). Only such an answer is exempt from ``positive_data_acceptance``; every
    other check still runs on it."""
    if response.status_code != 400:
        return False
    error = response.json().get("error", {})
    param, message = error.get("param") or "", error.get("message", "")
    return (
        (param in ("max_tokens", "messages", "prompt") and "context length" in message)
        or (param == "prompt" and "outside the vocabulary" in message)
        or param.startswith("response_format.json_schema")
        or (param == "max_tokens" and "max_completion_tokens differ" in message)
        or (param == "stream_options" and "only allowed with stream=true" in message)
        # rules between fields of the OpenAI API: a tool message's content, best_of against n
        or (param.startswith("messages[") and "message needs content" in message)
        or (param == "best_of" and "send best_of equal to n" in message)
        # embeddings: token ids are another tokenizer's (the spec keeps OpenAI's input shape)
        or (param == "input" and "input holds token ids" in message)
        # a field OpenAI defines that cannot apply here, refused naming it and why
        or (bool(param) and message.startswith(param.split(".")[0]) and " is not supported" in message)
    )


def call(client: httpx.Client, case) -> httpx.Response:
    """Send ``case`` with httpx, the project's HTTP client."""
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
        case.validate_response(
            response,
            checks=[c for c in CHECKS if not (c is positive_data_acceptance and over_context(response))],
            transport_kwargs=case.as_transport_kwargs(base_url=str(client.base_url).rstrip("/")),
        )
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


def test_schemathesis_cli_with_all_checks_finds_nothing(fuzz_app, tmp_path):
    """The run an operator makes: ``schemathesis run --checks all`` with its examples, coverage
    (every unsupported method, boundary values) and fuzzing phases, through its own HTTP
    transport (requests), against the live app; ``schemathesis.toml`` beside this file holds
    the one exemption (``over_context``)."""
    import subprocess
    import sys
    from pathlib import Path

    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
        "run", f"{fuzz_app.url}/openapi.json", "--url", fuzz_app.url,
        "--checks", "all", "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(EXAMPLES), "--generation-deterministic", "--workers", "1",
        "--report", "ndjson", "--report-dir", str(tmp_path), "--no-color",
    ]
    # cwd: schemathesis keeps a cache folder (.schemathesis) where it runs
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-12_000:] + done.stderr[-3_000:]
