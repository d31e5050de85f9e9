"""Backup, restore and verification of the session state under one root URI.

A backup is laid out like a state root, plus ``manifest.json``::

    <backup>/manifest.json
    <backup>/shard-000/snapshots/<lsn>.parquet    the shard as of the cut
    <backup>/shard-000/archive/<ms>-<id>.parquet  archived (expired) sessions, copied as they are

Point in time: the cut is one wall-clock time ``at`` (default: when the backup starts). Each
shard is read as latest snapshot + the log records stamped at or before the cut, which is a
prefix of that shard's log, hence a consistent state; the shards, which share no session, are
all cut at the same time. A snapshot taken during the backup can only move a shard's cut later
(recorded per shard). Reading needs no pause of the writers; a segment removed by a concurrent
snapshot makes that shard be read again.

The manifest, written last, lists every file with its size, SHA-256 and row counts; ``verify``
checks all of them and that every row loads as the current ``ModelState``. ``restore`` verifies
first, then copies the files into an empty root (``force`` wipes it): run it while the store
actors are stopped, since they keep their state in memory.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from actors.sessions.snapshot import (
    decode_state_table,
    encode_state_table,
    list_archives,
    load_shard,
    row_of,
    snapshot_name,
)
from actors.sessions.storage import StateLocation, open_location, sha256_hex
from cluster.errors import CheckpointError, InvalidRequestError
from cluster.logging_setup import get_logger
from cluster.state import STATE_SCHEMA_VERSION

log = get_logger("actors.sessions.backup")

BACKUP_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-\d{3,}$")


class BackupFile(BaseModel):
    path: str
    bytes: int
    sha256: str
    sessions: int
    turns: int
    messages: int


class ShardBackup(BaseModel):
    shard: str
    snapshot: BackupFile
    view_lsn: int = Field(description="The last log position the snapshot reflects.")
    cut_ts: float
    archives: list[BackupFile] = Field(default_factory=list)


class BackupManifest(BaseModel):
    format_version: int = BACKUP_FORMAT
    schema_version: int = STATE_SCHEMA_VERSION
    created_at: float
    cut_ts: float
    source: str
    shards: list[ShardBackup]
    sessions: int
    turns: int
    messages: int

    def files(self) -> list[BackupFile]:
        return [f for s in self.shards for f in [s.snapshot, *s.archives]]


def _describe(path: str, data: bytes) -> BackupFile:
    table = decode_state_table(data, path)
    return BackupFile(
        path=path,
        bytes=len(data),
        sha256=sha256_hex(data),
        sessions=len(table.states),
        turns=sum(s.turn_count for s in table.states),
        messages=sum(len(s.conversation_context.messages) for s in table.states),
    )


def _shards(location: StateLocation) -> list[str]:
    return [name for name in location.list_folders() if SHARD_RE.match(name)]


def backup_state(
    source: str,
    destination: str,
    *,
    at: float | None = None,
    include_archives: bool = True,
    attempts: int = 3,
    source_fs: Any = None,
    destination_fs: Any = None,
) -> BackupManifest:
    """Copy the state under ``source`` as of ``at`` (default now) to ``destination``."""
    src = open_location(source, source_fs)
    dst = open_location(destination, destination_fs)
    if not dst.is_empty():
        raise InvalidRequestError(
            f"backup destination {dst.display} is not empty; give a new URI for each backup",
            param="to",
        )
    started = time.time()
    cut = started if at is None else at
    shards: list[ShardBackup] = []
    for shard in _shards(src):
        loc = src.child(shard)
        for attempt in range(attempts):
            try:
                loaded = load_shard(loc, until_ts=cut)
                break
            except FileNotFoundError:  # a snapshot removed a segment while we read: read again
                if attempt == attempts - 1:
                    raise
        states = sorted(loaded.sessions.values(), key=lambda s: s.session_id)
        meta = {
            "kind": "backup",
            "schema_version": STATE_SCHEMA_VERSION,
            "covered_lsn": loaded.view_lsn,
            "covered_ts": repr(loaded.cut_ts),
            "shard": shard,
        }
        data = encode_state_table([row_of(s) for s in states], meta)
        path = f"{shard}/{snapshot_name(loaded.view_lsn)}"
        dst.write_atomic(path, data)
        archives = []
        if include_archives:
            for name in list_archives(loc):
                blob = loc.read_bytes(name)
                dst.write_atomic(f"{shard}/{name}", blob)
                archives.append(_describe(f"{shard}/{name}", blob))
        shards.append(
            ShardBackup(
                shard=shard,
                snapshot=_describe(path, data),
                view_lsn=loaded.view_lsn,
                cut_ts=loaded.cut_ts or cut,
                archives=archives,
            )
        )
    manifest = BackupManifest(
        created_at=started,
        cut_ts=cut,
        source=src.display,
        shards=shards,
        sessions=sum(s.snapshot.sessions for s in shards),
        turns=sum(s.snapshot.turns for s in shards),
        messages=sum(s.snapshot.messages for s in shards),
    )
    dst.write_atomic(MANIFEST, manifest.model_dump_json(indent=2).encode())
    log.info(
        "state backup written",
        extra={
            "to": dst.display,
            "shards": len(shards),
            "sessions": manifest.sessions,
            "s": round(time.time() - started, 3),
        },
    )
    return manifest


def read_manifest(location: StateLocation) -> BackupManifest:
    if not location.exists(MANIFEST):
        raise CheckpointError(
            f"{location.display} has no {MANIFEST}: not a backup, or one that did not finish; "
            f"take a new backup"
        )
    try:
        manifest = BackupManifest.model_validate_json(location.read_bytes(MANIFEST))
    except ValidationError as exc:
        raise CheckpointError(
            f"{location.display}/{MANIFEST} is malformed: {exc.errors()[0]['msg']}"
        ) from None
    if manifest.format_version > BACKUP_FORMAT:
        raise CheckpointError(
            f"backup format_version={manifest.format_version} is newer than this M-AI reads "
            f"({BACKUP_FORMAT}); upgrade M-AI"
        )
    return manifest


def verify_backup(uri: str, *, filesystem: Any = None) -> dict[str, Any]:
    """Check every file of a backup against its manifest; ``ok`` is False with ``problems``."""
    location = open_location(uri, filesystem)
    problems: list[str] = []
    try:
        manifest = read_manifest(location)
    except CheckpointError as exc:
        return {"ok": False, "problems": [exc.message], "backup": location.display}
    for expected in manifest.files():
        try:
            data = location.read_bytes(expected.path)
        except FileNotFoundError:
            problems.append(f"{expected.path}: missing")
            continue
        if len(data) != expected.bytes or sha256_hex(data) != expected.sha256:
            problems.append(f"{expected.path}: size or SHA-256 differs from the manifest (damaged)")
            continue
        try:
            found = _describe(expected.path, data)
        except (CheckpointError, ValidationError) as exc:
            problems.append(f"{expected.path}: rows do not load: {exc}")
            continue
        for key in ("sessions", "turns", "messages"):
            if getattr(found, key) != getattr(expected, key):
                problems.append(
                    f"{expected.path}: {key}={getattr(found, key)} but the manifest says {getattr(expected, key)}"
                )
    listed = {f.path for f in manifest.files()} | {MANIFEST}
    for shard in _shards(location):
        sub = location.child(shard)
        for folder in ("snapshots", "archive", "wal"):
            for name in sub.list_files(folder):
                if f"{shard}/{name}" not in listed:
                    problems.append(f"{shard}/{name}: not in the manifest")
    totals = {
        "sessions": sum(s.snapshot.sessions for s in manifest.shards),
        "turns": sum(s.snapshot.turns for s in manifest.shards),
    }
    if totals["sessions"] != manifest.sessions or totals["turns"] != manifest.turns:
        problems.append(
            f"manifest totals {manifest.sessions}/{manifest.turns} differ from its shards {totals}"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "backup": location.display,
        "cut_ts": manifest.cut_ts,
        "shards": len(manifest.shards),
        "sessions": manifest.sessions,
        "turns": manifest.turns,
        "messages": manifest.messages,
        "files": len(manifest.files()),
    }


def restore_state(
    backup: str,
    root: str,
    *,
    force: bool = False,
    backup_fs: Any = None,
    root_fs: Any = None,
) -> dict[str, Any]:
    """Bring the backup at ``backup`` back under ``root`` (which must be empty unless ``force``)."""
    source = open_location(backup, backup_fs)
    target = open_location(root, root_fs)
    report = verify_backup(backup, filesystem=backup_fs)
    if not report["ok"]:
        raise CheckpointError(
            f"backup {source.display} failed verification, nothing restored: "
            + "; ".join(report["problems"])
        )
    if not target.is_empty():
        if not force:
            raise InvalidRequestError(
                f"restore target {target.display} holds state; stop the store actors and pass "
                f"force (--force) to replace it",
                param="to",
            )
        target.wipe()
    manifest = read_manifest(source)
    for entry in manifest.files():
        data = source.read_bytes(entry.path)
        if sha256_hex(data) != entry.sha256:  # changed since verification
            raise CheckpointError(f"{entry.path} changed during the restore; run it again")
        target.write_atomic(entry.path, data)
    log.info(
        "state restored",
        extra={"from": source.display, "to": target.display, "sessions": manifest.sessions},
    )
    return {
        "restored": True,
        "from": source.display,
        "to": target.display,
        "cut_ts": manifest.cut_ts,
        "shards": len(manifest.shards),
        "sessions": manifest.sessions,
        "turns": manifest.turns,
        "files": len(manifest.files()),
    }


def manifest_json(manifest: BackupManifest) -> dict[str, Any]:
    return json.loads(manifest.model_dump_json())


__all__ = [
    "BackupManifest",
    "BackupFile",
    "ShardBackup",
    "backup_state",
    "verify_backup",
    "restore_state",
    "read_manifest",
    "manifest_json",
    "MANIFEST",
]
