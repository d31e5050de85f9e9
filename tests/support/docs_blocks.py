"""The code blocks of README.md and docs/*.md, and a fresh shell to run them in.

A fence's info string is the language, then tags (``` ```bash run ```):

- ``run``: runs as written, from the clone's directory, against a live application on
  127.0.0.1:8000 (tests/e2e/test_docs.py);
- ``handle``: Python with ``handle`` bound to the application (tests/integration/test_handle_docs.py);
- ``server``: starts a server that runs until Ctrl-C;
- ``long``: takes minutes (benchmarks, tuning sweeps);
- ``gpu``: needs a GPU (or real Llama 2 weights);
- ``cluster``: needs a Ray cluster started by ``ray start``/``ray up``, or Kubernetes;
- ``external``: needs a service outside M-AI (Prometheus, Grafana, a cloud store);
- ``fragment``: a piece of a larger program (names defined elsewhere).

Every bash/sh/python block carries one of them (tests/e2e/test_docs.py checks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z]+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL = frozenset({"bash", "sh", "shell"})
CODE = SHELL | {"python"}
TAGS = frozenset({"run", "handle", "server", "long", "gpu", "cluster", "external", "fragment"})
DOCS_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    tags: frozenset[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(Block(page, line, m.group(1), frozenset(m.group(2).split()), m.group(3)))
    return found


def runnable(tag: str = "run") -> list[Block]:
    return [b for b in blocks() if b.lang in CODE and tag in b.tags]


class FreshShell:
    """A new user's shell after the README's set-up: the working directory is a copy of the
    clone's layout (links to its files, ``.venv`` -> the environment running the tests), PATH
    is the system's (no environment activated), HOME is the user's (the checkpoint cache)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="m-ai-docs-"))
        for entry in REPO_ROOT.iterdir():
            if entry.name not in (".venv", ".git"):
                (self.dir / entry.name).symlink_to(entry)
        (self.dir / ".venv").symlink_to(Path(sys.prefix))
        venv_bin = str(Path(sys.executable).parent)
        path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin]
        self.env = {
            "PATH": os.pathsep.join(path),
            "HOME": os.environ.get("HOME", str(self.dir)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            # What the editable install gives a clone: its own packages first.
            "PYTHONPATH": str(REPO_ROOT),
            "DS_ACCELERATOR": "cpu",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def run(self, block: Block, url: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run ``block`` with the docs' address replaced by ``url`` (output captured)."""
        code = block.code.replace(DOCS_URL, url)
        if block.lang == "python":
            script = self.dir / f"block_{block.line}.py"
            script.write_text(code)
            command = [".venv/bin/python", script.name]
        else:
            script = self.dir / f"block_{block.line}.sh"
            script.write_text("set -euo pipefail\n" + code)
            command = ["bash", script.name]
        return self.command(command, timeout=timeout, stdin=stdin)

    def command(self, command: list[str] | str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
        if isinstance(command, str):
            command = ["bash", "-c", "set -euo pipefail\n" + command]
        return subprocess.run(
            command, cwd=self.dir, env=self.env, input=stdin, capture_output=True, text=True,
            timeout=timeout,
        )


__all__ = ["Block", "blocks", "runnable", "FreshShell", "TAGS", "CODE", "DOCS_URL", "PAGES"]
