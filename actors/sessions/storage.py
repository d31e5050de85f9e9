"""Where session state lives: one root URI, reached through ``pyarrow.fs``.

A root is a local directory (a plain path or ``file://``) or an object store prefix
(``s3://bucket/prefix``, ``gs://bucket/prefix``; S3 options such as
``?endpoint_override=host:port&scheme=http`` go in the query string, credentials come from
the usual provider chain). Everything above this module speaks in paths relative to the root.

Objects are written whole: on an object store one PUT is atomic (the object appears complete or
not at all); on local disk the same guarantee comes from write-to-temporary, fsync, rename,
fsync of the directory. Appending is local-only (``LocalAppendFile``): pyarrow exposes no fsync,
so the one durable-append path uses the operating system's file directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from cluster.errors import ConfigError

TMP_SUFFIX = ".tmp"


def redact(uri: str) -> str:
    """``uri`` without credentials, for logs and reports."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class StateLocation:
    """A root (or a folder under it) on one filesystem."""

    fs: pafs.FileSystem
    base: str
    display: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str = "") -> str:
        """The filesystem path of ``relative`` (``""`` is the base itself)."""
        relative = relative.strip("/")
        return f"{self.base}/{relative}" if relative else self.base

    def child(self, relative: str) -> StateLocation:
        """A location rooted at a folder under this one."""
        relative = relative.strip("/")
        return StateLocation(self.fs, self.path(relative), f"{self.display.rstrip('/')}/{relative}")

    # -- reading ----------------------------------------------------------------------------

    def list_files(self, folder: str = "", suffix: str = "") -> list[str]:
        """Relative paths of the files directly under ``folder`` ending in ``suffix``, sorted."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        base = self.path(folder)
        names = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            name = info.path[len(base) :].lstrip("/")
            names.append(f"{folder.strip('/')}/{name}" if folder.strip("/") else name)
        return sorted(names)

    def list_folders(self) -> list[str]:
        """Names of the folders directly under the base."""
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        return sorted(
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory
        )

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def is_empty(self) -> bool:
        selector = pafs.FileSelector(self.base, allow_not_found=True, recursive=True)
        return not any(i.type == pafs.FileType.File for i in self.fs.get_file_info(selector))

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    # -- writing ----------------------------------------------------------------------------

    def ensure_folder(self, relative: str = "") -> None:
        if self.is_local:
            self.fs.create_dir(self.path(relative), recursive=True)

    def write_atomic(self, relative: str, data: bytes) -> None:
        """``data`` at ``relative``, seen complete or not at all (also after a crash)."""
        target = self.path(relative)
        if not self.is_local:
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{target}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_folder(folder)

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def delete_folder(self, relative: str) -> None:
        """Remove a folder and everything in it (no error when it is gone already)."""
        try:
            self.fs.delete_dir(self.path(relative))
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self, older_than_s: float) -> list[str]:
        """Temporary files of whole-object writes cut short by a crash; returns their paths
        relative to the base."""
        selector = pafs.FileSelector(self.base, allow_not_found=True, recursive=True)
        cutoff = time.time() - older_than_s
        removed = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(TMP_SUFFIX):
                continue
            if info.mtime is None or info.mtime.timestamp() < cutoff:
                self.fs.delete_file(info.path)
                removed.append(info.path[len(self.base) :].lstrip("/"))
        return removed

    def wipe(self) -> None:
        """Remove everything under the base (the base itself may stay)."""
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        if self.fs.get_file_info(selector):
            self.fs.delete_dir_contents(self.base, missing_dir_ok=True)


def fsync_folder(folder: str) -> None:
    """Make a new or renamed directory entry durable (POSIX needs the folder itself synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def open_location(uri: str, filesystem: pafs.FileSystem | None = None) -> StateLocation:
    """The location of ``uri``; ``filesystem`` (with ``uri`` a path on it) skips URI parsing."""
    if not uri or "\x00" in uri:
        raise ConfigError(f"state uri={uri!r} is empty; give a directory or s3:// / gs:// URI")
    if filesystem is not None:
        return StateLocation(filesystem, uri.rstrip("/"), uri)
    if not _SCHEME_RE.match(uri):
        path = os.path.abspath(os.path.expanduser(uri))
        return StateLocation(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
        raise ConfigError(
            f"state uri={redact(uri)!r} cannot be opened ({exc}); use a path, file://, s3:// or gs://"
        ) from None
    return StateLocation(fs, path.rstrip("/"), redact(uri))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class LocalAppendFile:
    """An append-only local file whose ``append`` returns once the bytes are on disk."""

    def __init__(self, path: str, *, fsync: bool = True) -> None:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.size = 0
        if fsync:
            fsync_folder(folder)  # the new file's name must survive a power loss too

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self.size += written
            view = view[written:]
        if self.fsync:
            _datasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


__all__ = [
    "StateLocation",
    "LocalAppendFile",
    "open_location",
    "redact",
    "sha256_hex",
    "fsync_folder",
    "TMP_SUFFIX",
]
