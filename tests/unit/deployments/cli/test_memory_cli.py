"""``m-ai memory report / list / search`` over a stored memory root."""

from __future__ import annotations

import asyncio
import json

import typer
from typer.testing import CliRunner

from actors.memory.shard import MemoryShard
from cluster.config.memory import MemoryConfig
from deployments.cli.memory import memory_app
from engine.embedding.embedders import HashingEmbedder
from engine.fake_engine import ByteTokenizer


def write_root(root) -> None:
    async def go():
        s = MemoryShard(MemoryConfig(embedder="hashing", storage_uri=str(root)), tokenizer=ByteTokenizer(),
                        embedder=HashingEmbedder())
        for i, text in enumerate(["I live in Oslo.", "I live in Oslo.", "My name is Kai.", "I moved to Bergen."]):
            await s.absorb_turn("acme", "kai", "s1", i, [{"role": "user", "content": text}], wait=True)
        await s.add_memory("globex", "eve", "The user keeps bees.")
        await s.recall("acme", "kai", "s1", "What is my name?", top_k=1)
        await s.close()

    asyncio.run(go())


def test_report_list_and_search(tmp_path):
    write_root(tmp_path)
    runner = CliRunner()
    before = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file())

    result = runner.invoke(memory_app, ["report", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["tenant"] for t in report["tenants"]] == ["acme", "globex"]
    kai = report["tenants"][0]["users_detail"][0]
    assert (kai["user"], kai["memories"], kai["history"]) == ("kai", 2, 1)
    assert kai["decisions"]["supersede"] == 1 and kai["dedup_rate"] == 0.25
    assert kai["most_used"][0] == {"id": kai["most_used"][0]["id"], "text": "The user's name is Kai.",
                                   "access_count": 1}

    one = json.loads(runner.invoke(memory_app, ["report", "--root", str(tmp_path), "--json",
                                                "--tenant", "globex"]).stdout)
    assert [t["tenant"] for t in one["tenants"]] == ["globex"]

    table = runner.invoke(memory_app, ["report", "--root", str(tmp_path)], terminal_width=200)
    assert table.exit_code == 0 and "kai" in table.output and "25%" in table.output

    listed = json.loads(runner.invoke(memory_app, ["list", "--root", str(tmp_path), "--tenant", "acme",
                                                   "--user", "kai", "--history"]).stdout)
    assert listed["total"] == 3

    found = runner.invoke(memory_app, ["search", "where do I live", "--root", str(tmp_path), "--tenant",
                                       "acme", "--user", "kai", "--embedder", "hashing"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["data"][0]["text"] == "The user lives in Bergen."

    after = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file())
    assert after == before  # read only


def test_errors_exit_non_zero(tmp_path):
    result = CliRunner().invoke(memory_app, ["list", "--root", str(tmp_path), "--tenant", "a", "--user", "b",
                                             "--limit", "0"])
    assert result.exit_code == 1 and "limit=0" in result.output
    app = typer.Typer()
    app.add_typer(memory_app, name="memory")  # how deployments/cli/main.py mounts it
    assert CliRunner().invoke(app, ["memory", "--help"]).exit_code == 0
