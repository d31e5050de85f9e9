"""Checkpoint stores: versions of checkpoints under one root of any ``pyarrow.fs`` filesystem.

Layout (the same on local disk, S3 and GCS)::

    <root>/<name>/<version>/<files...>
    <root>/<name>/<version>/manifest.json     written last: the version is complete

A version is immutable once its manifest exists; a new version is a new directory, and old
versions stay until removed. The local cache that the loader reads from is a store too.

URIs: a path or ``file://`` (local), ``s3://bucket/prefix``, ``gs://bucket/prefix``. pyarrow
takes S3 options as query parameters, e.g. ``s3://bucket/ckpt?endpoint_override=host:9000&scheme=http``
for an S3-compatible server; credentials come from the usual AWS/GCP sources.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cluster.checkpoints.manifest import (
    MANIFEST_FILE,
    CheckpointManifest,
    CheckpointRef,
    is_ref,
    manifest_from_directory,
    parse_ref,
    sha256_stream,
)
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("cluster.checkpoints.store")

COPY_CHUNK = 8 << 20
DEFAULT_CACHE_DIR = Path("~/.cache/m-ai/checkpoints")
STORE_SCHEMES = ("file", "s3", "gs", "gcs")


_SECRET_PARAMS = ("access_key", "secret_key", "session_token")


def _redact(uri: str) -> str:
    """``uri`` without secret query parameters (kept: endpoint_override, scheme, region...)."""
    base, _, query = uri.partition("?")
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0] not in _SECRET_PARAMS]
    return base + ("?" + "&".join(kept) if kept else "")


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


@dataclass(frozen=True)
class FileProblem:
    """A file that failed verification, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CheckpointStore:
    """Checkpoint versions under ``root`` of ``filesystem`` (see the module docstring)."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, uri: str | None = None) -> None:
        self.fs = filesystem
        self.root = root.rstrip("/") or "/"
        self.uri = uri or root

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_uri(cls, uri: str | Path) -> CheckpointStore:
        """A store for a local path, ``file://``, ``s3://`` or ``gs://`` URI."""
        text = str(uri)
        scheme = urlsplit(text).scheme if "://" in text else ""
        if scheme in ("", "file"):
            local = Path(text[len("file://"):] if scheme else text).expanduser().absolute()
            return cls(pafs.LocalFileSystem(), str(local), str(local))
        if scheme not in STORE_SCHEMES:
            raise CheckpointError(
                f"store URI {_redact(text)!r} has scheme {scheme!r}; use a path, file://, s3:// or gs://",
                param="store",
            )
        if scheme == "gcs":
            text = "gs://" + text[len("gcs://"):]
        try:
            filesystem, root = pafs.FileSystem.from_uri(text)
        except (pafs.ArrowException, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot open store {_redact(text)!r}: {exc}", param="store") from None
        return cls(filesystem, root, _redact(text))

    @classmethod
    def local_cache(cls, cache_dir: str | Path | None = None) -> CheckpointStore:
        """The local cache the loader reads from (default ``~/.cache/m-ai/checkpoints``)."""
        return cls.from_uri(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    # -- paths ------------------------------------------------------------------------------

    def version_dir(self, ref: CheckpointRef) -> str:
        return posixpath.join(self.root, ref.name, ref.version)

    def file_path(self, ref: CheckpointRef, rel: str) -> str:
        return posixpath.join(self.version_dir(ref), rel)

    def local_path(self, ref: CheckpointRef) -> Path:
        """The directory of ``ref`` on local disk (local stores only)."""
        if not self.is_local:
            raise CheckpointError(f"store {self.uri!r} is not on local disk", param="store")
        return Path(self.version_dir(ref))

    def ref_uri(self, ref: CheckpointRef) -> str:
        """The URI that names ``ref`` in this store (what ``checkpoint:`` in a config accepts)."""
        base, query = _split_query(self.uri if "://" in self.uri else Path(self.uri).as_uri())
        return f"{base.rstrip('/')}/{ref}{query}"

    # -- reading ----------------------------------------------------------------------------

    def _list_dirs(self, path: str) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (pafs.ArrowException, OSError) as exc:
            raise CheckpointError(f"cannot list {self.uri!r}: {exc}", param="store") from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def has(self, ref: CheckpointRef) -> bool:
        """Whether ``ref`` is complete here (its manifest exists)."""
        return self._exists(self.file_path(ref, MANIFEST_FILE))

    def names(self) -> list[str]:
        return [n for n in self._list_dirs(self.root) if self.versions(n)]

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name``, oldest first."""
        found = [
            self.manifest(CheckpointRef(name, v))
            for v in self._list_dirs(posixpath.join(self.root, name))
            if is_ref(f"{name}@{v}") and self.has(CheckpointRef(name, v))
        ]
        return [m.version for m in sorted(found, key=lambda m: m.created)]

    def manifests(self) -> list[CheckpointManifest]:
        return [self.manifest(CheckpointRef(n, v)) for n in self.names() for v in self.versions(n)]

    def manifest(self, ref: CheckpointRef | str) -> CheckpointManifest:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        path = self.file_path(ref, MANIFEST_FILE)
        try:
            with self.fs.open_input_stream(path) as handle:
                text = handle.read().decode("utf-8")
        except FileNotFoundError:
            known = ", ".join(f"{ref.name}@{v}" for v in self.versions(ref.name)) or "none"
            raise CheckpointError(
                f"checkpoint {ref} is not in store {self.uri!r} (versions of {ref.name}: {known}); "
                "pull or publish it first",
                param="checkpoint",
            ) from None
        except (pafs.ArrowException, OSError) as exc:
            raise CheckpointError(f"cannot read {ref} from {self.uri!r}: {exc}", param="checkpoint") from None
        manifest = CheckpointManifest.from_json(text, where=f"manifest of {ref} in {self.uri}")
        if manifest.ref != ref:
            raise CheckpointError(f"manifest at {ref} in {self.uri!r} names {manifest.ref}; the store is inconsistent")
        return manifest

    def open_file(self, ref: CheckpointRef, rel: str):
        """A random-access reader of one file of ``ref`` (``seek`` + ``read``)."""
        return self.fs.open_input_file(self.file_path(ref, rel))

    def verify(self, ref: CheckpointRef, on_bytes: Callable[[int], None] | None = None) -> list[FileProblem]:
        """Re-read every file of ``ref`` and compare sizes and sha256 with its manifest."""
        manifest = self.manifest(ref)
        problems = []
        for entry in manifest.files:
            path = self.file_path(ref, entry.path)
            info = self.fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                problems.append(FileProblem(entry.path, "missing"))
                continue
            if info.size != entry.size:
                problems.append(FileProblem(entry.path, f"size {info.size}, manifest says {entry.size}"))
                continue
            with self.fs.open_input_stream(path) as handle:
                digest = sha256_stream(handle.read, on_bytes)
            if digest != entry.sha256:
                problems.append(FileProblem(entry.path, f"sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}..."))
        return problems

    # -- writing ----------------------------------------------------------------------------

    def write_manifest(self, manifest: CheckpointManifest) -> None:
        """Write ``manifest`` (atomically on local disk; S3/GCS objects appear whole)."""
        path = self.file_path(manifest.ref, MANIFEST_FILE)
        data = manifest.to_json().encode("utf-8")
        if self.is_local:
            tmp = Path(path).with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def publish(
        self,
        local_dir: str | Path,
        ref: CheckpointRef | str,
        source: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> CheckpointManifest:
        """Copy the checkpoint directory ``local_dir`` into this store as ``ref``.

        Files whose content an older version of the same name already holds are copied within
        the store; the manifest is written last. A version that exists is never overwritten.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if self.has(ref):
            raise CheckpointError(
                f"{ref} already exists in {self.uri!r}; versions are immutable: publish a new version",
                param="checkpoint",
            )
        manifest = manifest_from_directory(local_dir, ref, source)
        older: dict[str, tuple[CheckpointRef, str]] = {}
        for version in self.versions(ref.name):
            old_ref = CheckpointRef(ref.name, version)
            for entry in self.manifest(old_ref).files:
                older.setdefault(entry.sha256, (old_ref, entry.path))
        self.fs.create_dir(self.version_dir(ref), recursive=True)
        for entry in manifest.files:
            dest = self.file_path(ref, entry.path)
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            if entry.sha256 in older:
                old_ref, old_path = older[entry.sha256]
                self.fs.copy_file(self.file_path(old_ref, old_path), dest)
                continue
            with open(Path(local_dir) / entry.path, "rb") as src, self.fs.open_output_stream(dest) as out:
                while chunk := src.read(COPY_CHUNK):
                    out.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        self.write_manifest(manifest)
        log.info("published checkpoint", extra={"ref": str(ref), "store": self.uri, "bytes": manifest.total_bytes})
        return manifest

    def remove(self, ref: CheckpointRef | str) -> None:
        """Delete version ``ref`` (its manifest first, so a half-removed version is never complete)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if not self.has(ref):
            raise CheckpointError(f"{ref} is not in store {self.uri!r}; nothing to remove", param="checkpoint")
        self.fs.delete_file(self.file_path(ref, MANIFEST_FILE))
        self.fs.delete_dir(self.version_dir(ref))
        if not self._list_dirs(posixpath.join(self.root, ref.name)):
            try:
                self.fs.delete_dir(posixpath.join(self.root, ref.name))
            except (pafs.ArrowException, OSError):
                pass  # another version appeared meanwhile, or leftovers: harmless
        log.info("removed checkpoint", extra={"ref": str(ref), "store": self.uri})


def split_ref_text(uri: str) -> tuple[str, CheckpointRef] | None:
    """``<store uri>/<name>@<version>[?query]`` -> (store URI with the query, ref), else None."""
    base, query = _split_query(uri)
    head, _, last = base.rstrip("/").rpartition("/")
    if not head or not is_ref(last) or head.endswith(":/") or head.endswith(":"):
        return None  # no store part (s3://name@version has no bucket)
    return head + query, parse_ref(last)


def split_ref_uri(uri: str) -> tuple[CheckpointStore, CheckpointRef] | None:
    """Like ``split_ref_text`` with the store opened."""
    split = split_ref_text(uri)
    return None if split is None else (CheckpointStore.from_uri(split[0]), split[1])
