"""docs/troubleshooting.md quotes the messages the product really writes.

Each message quoted in the first column of its tables (and the paragraphs of 413, 499, 500) is
split at its placeholders (``N``, ``'X'``, ``…``); every fixed piece must occur in one string
literal of the code (f-strings count their fixed parts; a value interpolated in the code may
stand where the doc shows a placeholder). The configuration messages are compared whole with
what ``load_config`` says about a file with those mistakes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cluster.config import load_config, plan_update
from cluster.errors import ConfigError
from tests.support.paths import REPO_ROOT

DOC = REPO_ROOT / "docs" / "troubleshooting.md"
CODE_DIRS = ("cluster", "engine", "actors", "deployments")
HOLE = "\x00"  # an interpolated value in a code string

# Placeholders of the doc: a quoted value, an uppercase letter (or two), a number with a unit,
# an ellipsis, or a bracketed list.
PLACEHOLDER = re.compile(
    r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|…|\.\.\.|\b\d+(\.\d+)?\s?s?\b|\b[A-Z]{1,2}\d?s?\b|\bTYPE\b|\bMESSAGE\b|\bNAME\b|\bPATH\b|\bFIELD\b"
)
CODE_SPAN = re.compile(r"(``?)(.+?)\1")
MIN_PIECE = 8  # shorter pieces ("; ", " of ") say nothing


def code_strings() -> list[str]:
    """Every string literal of the product, f-strings with their values as ``HOLE``."""
    found = []
    for folder in CODE_DIRS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.append(node.value)
                elif isinstance(node, ast.JoinedStr):
                    found.append(
                        "".join(
                            v.value if isinstance(v, ast.Constant) else HOLE for v in node.values
                        )
                    )
    return found


def quoted_messages() -> list[str]:
    """The messages in the first column of the doc's tables, and the 413/499/500 paragraphs."""
    messages = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `") or line.startswith("| ``"):
            first_cell = re.split(r"\s\|\s", line[2:], maxsplit=1)[0]
            messages += [m.strip() for _, m in CODE_SPAN.findall(first_cell)]  # markdown drops the padding space
        elif line.startswith("`") and " — " in line:  # the 413, 499 and 500 paragraphs
            messages += [m for _, m in CODE_SPAN.findall(line.split(" — ")[0])]
    return [m for m in messages if len(m) > 12 and not m.startswith(("GET ", "m-ai ", "serve "))]


# Words of messages that Ray, pydantic or Starlette write, not M-AI (quoted for recognition).
LIBRARY_WORDS = (
    "Field required", "Input should be a valid", "Extra inputs are not permitted",
    "List should have at most", "items after validation", "Not Found", "Method Not Allowed",
    "ActorDiedError", "The deployment failed to start", "times in a row.", "TypeError",
    "invalid device ordinal",
)


def pieces(message: str) -> list[str]:
    # punctuation next to a placeholder may belong to the code's interpolated part
    stripped = (p.strip(" :;,.()'\"") for p in PLACEHOLDER.split(message) if p)
    return [p for p in stripped if len(p) >= MIN_PIECE]


def matches(piece: str, code: str, literal_share: float = 0.5) -> bool:
    """Whether ``piece`` is part of some message ``code`` can write: a glob match that may
    start and end anywhere in ``code``, where a ``HOLE`` of ``code`` stands for any text but
    at least ``literal_share`` of the piece must match the code's own characters."""
    m = len(code)
    # best[j]: most characters of the piece so far matched literally, code[j] next (-1: none)
    best = [0] * (m + 1)
    for char in piece:
        for j in range(m):  # a hole may take nothing
            if best[j] >= 0 and code[j] == HOLE:
                best[j + 1] = max(best[j + 1], best[j])
        nxt = [-1] * (m + 1)
        for j in range(m):
            if best[j] < 0:
                continue
            if code[j] == HOLE:  # the hole takes this character (and maybe more)
                nxt[j] = max(nxt[j], best[j])
                nxt[j + 1] = max(nxt[j + 1], best[j])
            elif code[j] == char:
                nxt[j + 1] = max(nxt[j + 1], best[j] + 1)
        if max(nxt) < 0:
            return False
        best = nxt
    return max(best) >= literal_share * len(piece)


def found_in_code(piece: str, strings: list[str]) -> bool:
    words = [w for w in re.split(r"[\s=:;,()'`.]+", piece) if len(w) >= 4]
    need = (len(words) + 1) // 2
    return any(
        sum(w in s for w in words) >= need and matches(piece, s) for s in strings
    )


def test_the_doc_quotes_messages():
    assert len(quoted_messages()) > 60


# Messages put together from several strings of the code, compared whole with the product
# below, and pydantic's messages behind a field name.
WHOLE = (
    "FIELD: ",
    "invalid m-ai.yaml: ", "config file m-ai.yaml ", "env='x' ", "unknown model config fields",
)


def checked_against_code() -> list[str]:
    return [
        m for m in quoted_messages()
        if not m.startswith(WHOLE) and not any(words in m for words in LIBRARY_WORDS)
    ]


@pytest.mark.parametrize("message", checked_against_code())
def test_each_quoted_message_is_written_by_the_code(message):
    strings = _strings()
    missing = [p for p in pieces(message) if not found_in_code(p, strings)]
    assert not missing, f"docs/troubleshooting.md quotes {message!r}, but the code never writes {missing}"


_CACHE: list[str] = []


def _strings() -> list[str]:
    if not _CACHE:
        _CACHE.extend(code_strings())
    return _CACHE


CONFIG_FILES = {
    "models:\n  - model_size: tiny\n    contxt_length: 1024\n": "models.0.contxt_length",
    "serving: {min_replicas: 3, max_replicas: 2}\n": "min_replicas=3",
    'serving: {api_keys: {"sk-abc": acme}}\n': "sha256",
    "serving: {shard_num_cpus: 1}\n": "renamed",
}


@pytest.mark.parametrize("text", list(CONFIG_FILES), ids=list(CONFIG_FILES.values()))
def test_the_configuration_messages_are_quoted_whole(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m-ai.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config("m-ai.yaml")
    assert caught.value.message in quoted_messages(), caught.value.message


def test_a_misspelled_key_gets_the_closest_known_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m-ai.yaml").write_text("serving: {prot: 8001, max_replica: 2}\nmemory: {zzzz: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config("m-ai.yaml")
    message = caught.value.message
    assert "serving.prot: unknown field (got 8001); did you mean `port`?" in message
    assert "serving.max_replica: unknown field (got 2); did you mean `max_replicas`?" in message
    assert "memory.zzzz: unknown field (got 1); the fields here are: " in message
    assert caught.value.param == "serving.prot"


def test_a_renamed_key_names_its_new_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m-ai.yaml").write_text(
        "serving: {shard_num_cpus: 1, shard_start_timeout_s: 60}\nmodels: [{cpu_threads_per_shard: 2}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config("m-ai.yaml")
    message = caught.value.message
    assert "serving.shard_num_cpus: unknown field (got 1); it was renamed to `rank_num_cpus`" in message
    assert "serving.shard_start_timeout_s: unknown field (got 60); it was renamed to `rank_start_timeout_s`" in message
    assert "models.0.cpu_threads_per_shard: unknown field (got 2); it was renamed to `cpu_threads_per_rank`" in message


def test_the_live_update_and_overlay_messages_are_quoted(tmp_path, monkeypatch):
    from cluster.config import ModelConfig

    with pytest.raises(ConfigError) as caught:
        plan_update(ModelConfig(), {"temprature": 0.1})
    head = caught.value.message.split(" known: ")[0]
    assert any(m.startswith(head) for m in quoted_messages()), caught.value.message
    monkeypatch.chdir(tmp_path)
    Path("m-ai.yaml").write_text("log_level: INFO\n")
    with pytest.raises(ConfigError) as caught:
        load_config("m-ai.yaml", env="x")
    assert caught.value.message in quoted_messages()
    Path("m-ai.yaml").write_text("models: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config("m-ai.yaml")
    head = caught.value.message.split(": ")[0] + ": …"
    assert head in quoted_messages(), caught.value.message
