"""The examples of docs/handle.md, run in order in one namespace (as a reader would run them)
against an application deployed on the session's Ray, with ``handle`` bound to it. Blocks
fenced as ``python cluster`` (attaching to or starting a cluster) are skipped; those fenced
``python handle`` run (the marks: tests/support/docs_blocks.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.serve_harness import app_config

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "handle.md"
BLOCK = re.compile(r"^```python (handle|cluster)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def examples() -> list[str]:
    return [code for tag, code in BLOCK.findall(GUIDE.read_text()) if tag == "handle"]


@pytest.fixture(scope="module")
def app(serve_cluster):
    deployed = serve_cluster.deploy(app_config(), prefix="handle-docs")  # the real engine
    yield deployed
    deployed.delete()


def test_the_guide_has_examples_of_every_topic():
    code = "\n".join(examples())
    for call in (
        "chat.remote",
        "chat_stream.remote",
        "complete.remote",
        "complete_stream.remote",
        "create_session.remote",
        "get_session.remote",
        "delete_session.remote",
    ):
        assert call in code, f"docs/handle.md shows no runnable {call}"


def test_the_guide_examples_run_against_a_deployed_app(app, capsys):
    namespace = {"handle": app.handle}
    for i, code in enumerate(examples()):
        try:
            exec(compile(code, f"docs/handle.md example {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"example {i + 1} failed:\n{code}") from exc
    printed = capsys.readouterr().out
    assert "tokens:" in printed  # the streaming example saw the usage chunk
    assert "model - model='no-such-model'" in printed  # the error example caught the 400
    assert "not found: session_id=" in printed  # another tenant cannot read the session
    assert namespace["reply"].session_id == namespace["session"].id
    assert len(namespace["answers"]) == 2 and all(namespace["answers"])
