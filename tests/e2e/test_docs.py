"""The documentation runs as written: every block of README.md and docs/*.md marked ``run``,
and every command ``m-ai serve`` prints, in a fresh shell (no environment activated) against
an application on the real tiny engine, deployed on the session's Ray
(tests/support/serve_harness.py). The docs' address, http://127.0.0.1:8000, is replaced by
the application's. Blocks that need a GPU, a cluster or minutes are marked so and not run
(tests/support/docs_blocks.py lists the marks); a test checks that every block has one."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.docs_blocks import CODE, TAGS, FreshShell, blocks, runnable
from tests.support.serve_harness import app_config

# A 4xx/5xx body in a block's output: the block ran but the server refused what it sent.
ERROR_BODY = re.compile(r'"error":\s*\{')


@pytest.fixture(scope="module")
def docs_app(serve_cluster):
    config = app_config(
        models=[{"max_tokens": 16, "max_num_seqs": 4, "context_length": 1024}], rank_num_cpus=0.5
    )
    deployed = serve_cluster.deploy(config, prefix="docs", engine_cls=None)  # the real engine
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def shell():
    return FreshShell()


def test_every_code_block_says_whether_and_how_it_runs():
    unmarked = [b.where for b in blocks() if b.lang in CODE and not b.tags & TAGS]
    assert not unmarked, (
        f"code blocks without a mark ({', '.join(sorted(TAGS))}) after the fence's language: "
        f"{unmarked}"
    )
    pages = {b.page.name for b in runnable()}
    assert {"README.md", "api.md"} <= pages


def _check(block_or_name, result) -> None:
    where = getattr(block_or_name, "where", block_or_name)
    shown = f"{where}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"exit code {result.returncode}: {shown}"
    assert not ERROR_BODY.search(result.stdout), f"an error answer: {shown}"


@pytest.mark.parametrize("block", runnable(), ids=lambda b: b.where)
def test_the_block_runs_as_written(block, docs_app, shell):
    result = shell.run(block, docs_app.url)
    _check(block, result)
    assert result.stdout.strip(), f"{block.where} printed nothing"


def test_the_commands_m_ai_serve_prints_run_as_printed(docs_app, shell):
    from deployments.cli.main import how_to_call

    text = how_to_call(docs_app_config(), docs_app.url)
    commands = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    assert len(commands) == 3, text
    curl, client, chat = commands
    for command in (curl, client):
        _check(command, shell.command(command))
    # the terminal chat: one turn, then /exit (as its banner and the printed comment say)
    assert "/exit" in chat
    result = shell.command(chat, stdin="Hello\n/exit\n", timeout=120)
    _check(chat, result)
    assert "m-ai>" in result.stdout and "/exit" in result.stdout


def docs_app_config():
    """The config the commands are printed for: the application's model, no API keys."""
    return app_config(models=[{"max_tokens": 16}])


def test_the_checkpoint_commands_of_the_readme_list_the_tiny_checkpoint(shell):
    made = shell.command(".venv/bin/m-ai checkpoint make-tiny --default", timeout=600)
    _check("m-ai checkpoint make-tiny --default", made)
    listed = shell.command(".venv/bin/m-ai checkpoint list")
    _check("m-ai checkpoint list", listed)
    assert "tiny-v1" in listed.stdout and "no checkpoints yet" not in listed.stdout


def test_the_session_block_continued_the_session(docs_app, shell):
    """The sessions example of docs/api.md stored its turn (it ran above, or runs now)."""
    (block,) = [b for b in runnable() if b.page.name == "api.md" and "/v1/sessions -H" in b.code]
    result = shell.run(block, docs_app.url)
    _check(block, result)
    # the last curl's answer: the session with its messages (curl adds no newline)
    last = result.stdout.rindex('{"id":"sess-')
    session, _ = json.JSONDecoder().raw_decode(result.stdout[last:])
    assert session["turns"] >= 1 and session["messages"][-2]["content"] == "My name is Ada."
    assert session["messages"][-1]["role"] == "assistant"
