"""``m-ai memory ...``: report, list and search the conversation memory stored under a root.

Mounted by ``deployments/cli/main.py`` with ``app.add_typer(memory_app, name="memory")``. The
commands read the Parquet files of ``memory.storage_uri`` (a directory, ``s3://...``,
``gs://...``) without writing them, so they are safe while the application runs (what the
memory actors changed in the last ``persist_interval_s`` may not be written yet).

    m-ai memory report --root DIR [--tenant T] [--user U] [--json]
    m-ai memory list   --root DIR --tenant T --user U [--history] [--limit N]
    m-ai memory search --root DIR --tenant T --user U "where do I live?" [--embedder minilm]
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cluster.errors import MAIError

memory_app = typer.Typer(
    help="Conversation memory: usage report, list and search a user's memories.",
    no_args_is_help=True,
    add_completion=False,
)

ROOT_HELP = "memory.storage_uri of the memory actors (directory, s3://..., gs://...)."


def _fail(exc: Exception, code: int = 1) -> NoReturn:
    message = exc.message if isinstance(exc, MAIError) else f"{type(exc).__name__}: {exc}"
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _shard(root: str, embedder: str = "minilm") -> Any:
    from actors.memory.shard import MemoryShard
    from cluster.config.memory import MemoryConfig

    return MemoryShard(MemoryConfig(storage_uri=root, embedder=embedder), read_only=True)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(report: dict[str, Any]) -> Table:
    table = Table(title="M-AI memory", show_lines=False)
    for column in ("tenant", "user", "memories", "history", "sessions", "bytes", "oldest", "most used",
                   "dedup rate"):
        table.add_column(column, overflow="fold")
    for tenant in report["tenants"]:
        table.add_row(f"[bold]{tenant['tenant']}[/bold]", f"{tenant['users']} users", str(tenant["memories"]),
                      str(tenant["history"]), str(tenant["sessions"]), _size(tenant["bytes"]),
                      "", "", tenant["warning"] or "")
        for row in tenant["users_detail"]:
            oldest = row["oldest"]
            used = row["most_used"][0] if row["most_used"] else None
            table.add_row(
                "", row["user"], str(row["memories"]), str(row["history"]), str(row["sessions"]),
                _size(row["bytes"]),
                f"{_when(oldest['created_at'])} {oldest['text']}" if oldest else "-",
                f"{used['access_count']}x {used['text']}" if used else "-",
                "-" if row["dedup_rate"] is None else f"{row['dedup_rate']:.0%}",
            )
    return table


@memory_app.command()
def report(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    tenant: str | None = typer.Option(None, help="Only this tenant."),
    user: str | None = typer.Option(None, help="Only this user (of --tenant)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Per tenant and user: memories, history, sessions, bytes, oldest, most used, dedup rate."""

    async def build() -> dict[str, Any]:
        shard = _shard(root)
        await shard.load_all()
        return await shard.report(tenant, user)

    try:
        result = asyncio.run(build())
    except (MAIError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    Console(soft_wrap=True).print(render_report(result))


@memory_app.command("list")
def list_memories(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    tenant: str = typer.Option(..., help="The tenant."),
    user: str = typer.Option(..., help="The user."),
    history: bool = typer.Option(False, "--history", help="Include superseded memories."),
    limit: int = typer.Option(100, help="At most this many (newest first)."),
) -> None:
    """One user's memories as JSON."""

    async def read() -> dict[str, Any]:
        return await _shard(root).list_memories(tenant, user, include_history=history, limit=limit)

    try:
        typer.echo(json.dumps(asyncio.run(read()), indent=2))
    except (MAIError, OSError) as exc:
        _fail(exc)


@memory_app.command()
def search(
    query: str = typer.Argument(..., help="What to look for."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    tenant: str = typer.Option(..., help="The tenant."),
    user: str = typer.Option(..., help="The user."),
    limit: int = typer.Option(10, help="At most this many."),
    embedder: str = typer.Option("minilm", help="The embedder the memory was written with."),
) -> None:
    """One user's memories closest to QUERY, as JSON (loads the embedder)."""

    async def find() -> dict[str, Any]:
        return await _shard(root, embedder).search_memories(tenant, user, query, limit=limit)

    try:
        typer.echo(json.dumps(asyncio.run(find()), indent=2))
    except (MAIError, OSError) as exc:
        _fail(exc)


__all__ = ["memory_app", "render_report"]
