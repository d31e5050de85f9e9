"""The ``m-ai`` command line: config commands, the chat client against a served app, and (slow)
``m-ai serve`` as a user runs it, answering the ``openai`` client and curl-style streams."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cluster.config.serving import hash_api_key
from deployments.cli.main import app as cli
from tests.support.serve_harness import app_config, free_port
from tests.support.serve_process import start_serve, streamed_hello

runner = CliRunner()


def test_config_validate_reports_ok_or_the_field_and_the_fix(tmp_path: Path):
    good = tmp_path / "m-ai.yaml"
    good.write_text("models:\n  - {tp_size: 2}\nserving: {port: 8100}\n")
    result = runner.invoke(cli, ["config", "validate", str(good)])
    assert (
        result.exit_code == 0
        and "m-ai-tiny (tp_size=2)" in result.output
        and "8100" in result.output
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {tp_size: 3}\n")
    result = runner.invoke(cli, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert "tp_size=3" in result.output and "use one of" in result.output


def test_config_show_applies_the_overlay_and_environment_variables(tmp_path: Path):
    base = tmp_path / "m-ai.yaml"
    base.write_text("serving: {port: 8100}\n")
    (tmp_path / "m-ai.prod.yaml").write_text("log_format: json\n")
    result = runner.invoke(
        cli,
        ["config", "show", str(base), "--env", "prod", "--format", "json"],
        env={"M_AI_SERVING__SESSION_STORE_SHARDS": "4"},
    )
    assert result.exit_code == 0, result.output
    assert '"log_format": "json"' in result.output and '"port": 8100' in result.output
    assert '"session_store_shards": 4' in result.output
    assert "M_AI_SERVING__SESSION_STORE_SHARDS" in result.output  # the override is reported


def test_config_hash_key_prints_the_digest_to_configure():
    result = runner.invoke(cli, ["config", "hash-key", "sk-secret"])
    assert result.exit_code == 0 and result.output.strip() == hash_api_key("sk-secret")


def test_chat_keeps_one_session_with_a_running_server(serve_cluster):
    app = serve_cluster.deploy(app_config(), prefix="cli-chat")  # the real engine
    try:
        result = runner.invoke(
            cli,
            ["chat", "--url", app.url, "--max-tokens", "16", "--temperature", "0"],
            input="my name is Ada\nwhat is my name\n/exit\n",
        )
        assert result.exit_code == 0, result.output
        session_id = re.search(r"session (sess-[A-Za-z0-9_-]+)", result.output).group(1)
        answers = result.output.split("m-ai>")[1:]
        assert len(answers) == 2
        stored = httpx.get(f"{app.url}/v1/sessions/{session_id}").json()
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
            "my name is Ada",
            "what is my name",
        ]
        # the server sends the history with each turn: the session's next prompt (its context
        # preview) holds both exchanges, the model's answers as stored, before the new message
        seen = httpx.post(f"{app.url}/v1/sessions/{session_id}/context", json={
            "model": "m-ai-tiny", "max_tokens": 16, "messages": [{"role": "user", "content": "and now?"}],
        }).json()
        turns = [m for m in seen["messages"] if m["role"] != "system"]
        assert turns == [{"role": m["role"], "content": m["content"]} for m in stored["messages"]] + [
            {"role": "user", "content": "and now?"}
        ], (seen, stored)
    finally:
        app.delete()


def test_chat_reports_an_unreachable_server():
    result = runner.invoke(cli, ["chat", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach" in result.output


@pytest.mark.slow
def test_checkpoint_make_tiny_writes_a_loadable_checkpoint(tmp_path: Path):
    result = runner.invoke(cli, ["checkpoint", "make-tiny", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    from engine.tokenizer import load_tokenizer

    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert load_tokenizer(tmp_path / "tiny").encode("hello", add_bos=False)


@pytest.mark.slow
def test_m_ai_serve_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path: Path):
    import openai

    port = free_port()
    served = start_serve(tmp_path, {"M_AI_SERVING__PORT": str(port)})
    try:
        served.wait_ready()
        output = served.output
        assert f"http://127.0.0.1:{port}" in output and "curl -N" in output

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        streamed_hello(client)
    finally:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=60) == 0
    # our own shutdown is quiet: no failed task of Serve's controller, no traceback
    logged = served.stderr()
    assert "graceful_shutdown failed" not in logged and "Traceback" not in logged, logged[-3000:]
