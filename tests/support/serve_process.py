"""``m-ai serve`` as a user runs it: a process of its own (its own Ray), read line by line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.serve_harness import REPO_ROOT

READY_LINE = "Ctrl-C stops the server"


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Until the server says it serves (fails with its output if it exits first)."""
        deadline = time.monotonic() + timeout_s
        while not any(READY_LINE in line for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.output
            time.sleep(0.5)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_serve(tmp_path: Path, env: dict[str, str]) -> ServeProcess:
    """``python -m deployments.cli.main serve`` with ``env`` over this environment; stdout is
    collected by a thread, stderr goes to a file in ``tmp_path``."""
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "deployments.cli.main", "serve"],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    served = ServeProcess(proc, stderr_path)
    threading.Thread(target=lambda: served.lines.extend(iter(proc.stdout.readline, "")),
                     daemon=True).start()
    return served


def streamed_hello(client) -> list:
    """The chunks of a streamed 8-token "Hello!" chat from the ``openai`` client ``client``:
    the first carries the assistant's role, the last a finish reason (both asserted)."""
    stream = client.chat.completions.create(
        model="m-ai-tiny",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    return chunks
