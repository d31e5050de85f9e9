"""``m-ai state ...``: backup, restore, verify and garbage collection of the session state.

Mounted by ``deployments/cli/main.py`` with ``app.add_typer(state_app, name="state")``. Every
command prints one JSON object on stdout (what it did) and exits non-zero on failure, with
the error on stderr. ``--root`` is the state root URI the store shards use (a directory, or
``s3://bucket/prefix?endpoint_override=...``, ``gs://...``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, NoReturn

import typer

from cluster.errors import MAIError

state_app = typer.Typer(
    help="Session state: backup, restore, verify, garbage collection.",
    no_args_is_help=True,
    add_completion=False,
)

ROOT_HELP = "State root URI of the session store (directory, s3://..., gs://...)."


def _emit(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


def _fail(exc: Exception, code: int = 1) -> NoReturn:
    message = exc.message if isinstance(exc, MAIError) else f"{type(exc).__name__}: {exc}"
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@state_app.command()
def backup(
    to: str = typer.Option(..., "--to", help="Backup URI; must be empty or absent."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    at: float | None = typer.Option(None, "--at", help="Cut time (Unix seconds); default now."),
    no_archives: bool = typer.Option(False, "--no-archives", help="Leave archived sessions out."),
) -> None:
    """Write a consistent point-in-time copy of the state to a URI (safe while serving)."""
    from actors.sessions.backup import backup_state, manifest_json

    try:
        manifest = backup_state(root, to, at=at, include_archives=not no_archives)
    except (MAIError, OSError) as exc:
        _fail(exc)
    _emit(manifest_json(manifest))


@state_app.command()
def restore(
    source: str = typer.Option(..., "--from", help="Backup URI written by `m-ai state backup`."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    force: bool = typer.Option(False, "--force", help="Replace the state already under --root."),
) -> None:
    """Verify a backup, then copy it under the root. Stop the application first."""
    from actors.sessions.backup import restore_state

    try:
        report = restore_state(source, root, force=force)
    except (MAIError, OSError) as exc:
        _fail(exc)
    _emit(report)


@state_app.command()
def verify(uri: str = typer.Argument(..., help="Backup URI.")) -> None:
    """Check a backup: manifest, sizes, SHA-256, record counts, every row loadable."""
    from actors.sessions.backup import verify_backup

    try:
        report = verify_backup(uri)
    except (MAIError, OSError) as exc:
        _fail(exc)
    _emit(report)
    if not report["ok"]:
        raise typer.Exit(1)


@state_app.command()
def gc(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    offline: bool = typer.Option(
        False,
        "--offline",
        help="Confirm the application is stopped (required: one writer per shard).",
    ),
    ttl_s: float | None = typer.Option(
        None, "--ttl-s", help="Idle seconds before a session expires."
    ),
    archive_retention_s: float | None = typer.Option(
        None, "--archive-retention-s", help="Age (s) after which archive files are removed."
    ),
) -> None:
    """Archive and delete idle sessions, compact logs, remove old snapshots and archives."""
    if not offline:
        print(
            "error: the store actors write this state while the application runs; stop it and "
            "pass --offline (a running application collects garbage in SessionShard.gc)",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    try:
        reports = asyncio.run(_gc_all(root, ttl_s, archive_retention_s))
    except (MAIError, OSError) as exc:
        _fail(exc)
    _emit({"shards": reports})


async def _gc_all(
    root: str, ttl_s: float | None, archive_retention_s: float | None
) -> dict[str, Any]:
    from actors.sessions.backup import SHARD_RE
    from actors.sessions.shard import SessionShard
    from actors.sessions.storage import open_location

    limits: dict[str, Any] = {}
    if ttl_s is not None:
        limits["ttl_s"] = ttl_s
    if archive_retention_s is not None:
        limits["archive_retention_s"] = archive_retention_s
    reports = {}
    for name in open_location(root).list_folders():
        if not SHARD_RE.match(name):
            continue
        shard = SessionShard(root, int(name.split("-", 1)[1]), limits=limits)
        try:
            reports[name] = await shard.gc()
        finally:
            await shard.close()
    return reports


__all__ = ["state_app"]
