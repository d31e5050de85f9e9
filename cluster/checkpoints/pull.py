"""Pull a checkpoint version from a store into the local cache: resumable, parallel, verified.

Every file is written to ``<version>/.partial/<path>`` and moved into place only after its
sha256 matches the manifest, so a file in place is always a verified one; the manifest is
written when every file is in place. Hence:

- resume: an interrupted pull leaves ``.partial`` files; the next pull hashes what is there
  and fetches only the rest (ranged reads);
- corruption: a bad or truncated download (or a bad partial) is deleted and fetched again;
  when the source copy itself is bad the file is refused with an error and nothing is loaded;
- incremental update: a file whose sha256 some other version in the cache already has is
  linked from there instead of downloaded, so a new version fetches only what changed;
- several processes pulling the same version wait on one file lock.

``verify_local`` checks a cached version; a record of (size, mtime) per verified file lets the
loader skip re-hashing files untouched since they were verified.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cluster.checkpoints.manifest import CheckpointManifest, CheckpointRef, FileEntry, sha256_file
from cluster.checkpoints.store import CheckpointStore, FileProblem
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("cluster.checkpoints.pull")

CHUNK = 8 << 20
PARTIAL_DIR = ".partial"
STAMPS_FILE = ".verified.json"
LOCK_DIR = ".locks"


class PullProgress(Protocol):
    """What a progress bar implements; ``advance`` is called from worker threads."""

    def start(self, ref: CheckpointRef, total_bytes: int, files: int) -> None: ...

    def advance(self, path: str, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, ref: CheckpointRef, total_bytes: int, files: int) -> None:
        pass

    def advance(self, path: str, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class PullResult:
    """What a pull did. ``complete`` is False when only some files were asked for."""

    ref: CheckpointRef
    path: Path
    manifest: CheckpointManifest
    complete: bool = False
    downloaded_bytes: int = 0
    resumed_bytes: int = 0
    fetched: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)


@contextmanager
def version_lock(cache: CheckpointStore, ref: CheckpointRef) -> Iterator[None]:
    """An exclusive lock on ``ref`` in the local ``cache`` (released when the process dies)."""
    lock_dir = Path(cache.root) / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{ref}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- verification records ---------------------------------------------------------------------


def _read_stamps(dest: Path) -> dict[str, list[int]]:
    try:
        return json.loads((dest / STAMPS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _write_stamps(dest: Path, stamps: dict[str, list[int]]) -> None:
    tmp = dest / f"{STAMPS_FILE}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        tmp.write_text(json.dumps(stamps, sort_keys=True))
        os.replace(tmp, dest / STAMPS_FILE)
    except OSError:  # a read-only checkpoint: files are hashed again next time, nothing worse
        log.debug("cannot record verified files", extra={"path": str(dest)})


def _check_file(path: Path, entry: FileEntry, stamps: dict[str, list[int]], quick: bool) -> str | None:
    """Why ``path`` does not hold ``entry`` (None when it does)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.size:
        return f"size {size}, manifest says {entry.size} (truncated or replaced)"
    if quick and stamps.get(entry.path) == _stamp(path):
        return None
    digest = sha256_file(path)
    if digest != entry.sha256:
        return f"sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}... (corrupted)"
    stamps[entry.path] = _stamp(path)
    return None


def verify_local(cache: CheckpointStore, ref: CheckpointRef, *, quick: bool = False) -> list[FileProblem]:
    """Check every file of the cached ``ref`` against its manifest.

    ``quick`` trusts files whose size and mtime are those recorded when they were last hashed;
    others (and all, without ``quick``) are hashed again.
    """
    manifest = cache.manifest(ref)
    dest = cache.local_path(ref)
    stamps = _read_stamps(dest)
    problems = []
    for entry in manifest.files:
        reason = _check_file(dest / entry.path, entry, stamps, quick)
        if reason:
            stamps.pop(entry.path, None)
            problems.append(FileProblem(entry.path, reason))
    _write_stamps(dest, stamps)
    return problems


# -- pulling ---------------------------------------------------------------------------------


class _Puller:
    def __init__(self, source: CheckpointStore, manifest: CheckpointManifest, cache: CheckpointStore,
                 progress: PullProgress, retries: int, result: PullResult) -> None:
        self.source = source
        self.ref = manifest.ref
        self.cache = cache
        self.dest = cache.local_path(self.ref)
        self.progress = progress
        self.retries = retries
        self.result = result
        self.stamps = _read_stamps(self.dest)
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.reusable = self._reusable_files()

    def _reusable_files(self) -> dict[str, Path]:
        """sha256 -> a verified file of another complete version in the cache."""
        out: dict[str, Path] = {}
        for manifest in self.cache.manifests():
            if manifest.ref == self.ref:
                continue
            base = self.cache.local_path(manifest.ref)
            stamps = _read_stamps(base)
            for entry in manifest.files:
                path = base / entry.path
                if stamps.get(entry.path) == (_stamp(path) if path.is_file() else None):
                    out.setdefault(entry.sha256, path)
        return out

    def _record(self, kind: str, path: str) -> None:
        with self.lock:
            getattr(self.result, kind).append(path)

    def _place(self, partial: Path, final: Path, entry: FileEntry) -> None:
        partial.chmod(0o444)  # a verified file is never written again, only replaced
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        with self.lock:
            self.stamps[entry.path] = _stamp(final)

    def fetch(self, entry: FileEntry) -> None:
        final = self.dest / entry.path
        if final.exists():
            with self.lock:
                stamps = dict(self.stamps)
            reason = _check_file(final, entry, stamps, quick=True)
            if reason is None:
                with self.lock:
                    self.stamps[entry.path] = stamps[entry.path]
                self.progress.advance(entry.path, entry.size)
                self._record("present", entry.path)
                return
            log.warning("cached file is bad; fetching it again", extra={"ref": str(self.ref), "file": entry.path, "reason": reason})
            final.unlink()
            self._record("refetched", entry.path)
        partial = self.dest / PARTIAL_DIR / entry.path
        partial.parent.mkdir(parents=True, exist_ok=True)
        if self._reuse(entry, partial, final):
            return
        problem = ""
        for attempt in range(1 + self.retries):
            problem = self._download(entry, partial)
            if not problem:
                self._place(partial, final, entry)
                return
            partial.unlink(missing_ok=True)
            log.warning("download failed verification", extra={"ref": str(self.ref), "file": entry.path,
                                                             "attempt": attempt + 1, "reason": problem})
        raise CheckpointError(
            f"{entry.path} of {self.ref} from {self.source.uri}: {problem} after {1 + self.retries} attempts; "
            f"the source copy is corrupted or truncated, so it is refused and never loaded; "
            f"republish {self.ref} or pull another version",
            param="checkpoint",
        )

    def _reuse(self, entry: FileEntry, partial: Path, final: Path) -> bool:
        src = self.reusable.get(entry.sha256)
        if src is None:
            return False
        partial.unlink(missing_ok=True)
        try:
            os.link(src, partial)  # same content, same inode: costs no disk space
        except OSError:
            shutil.copyfile(src, partial)
        if partial.stat().st_size == entry.size and sha256_file(partial) == entry.sha256:
            os.replace(partial, final)
            with self.lock:
                self.stamps[entry.path] = _stamp(final)
            self.progress.advance(entry.path, entry.size)
            self._record("reused", entry.path)
            return True
        partial.unlink(missing_ok=True)
        return False

    def _download(self, entry: FileEntry, partial: Path) -> str:
        """Fetch the missing tail of ``partial``; return why it is bad ('' when verified)."""
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > entry.size:
            partial.unlink()
            offset = 0
        digest = hashlib.sha256()
        if offset:
            with open(partial, "rb") as done:
                while chunk := done.read(CHUNK):
                    digest.update(chunk)
            self.progress.advance(entry.path, offset)
        resumed, fetched = offset, 0
        try:
            with self.source.open_file(self.ref, entry.path) as src, open(partial, "ab") as out:
                if offset:
                    src.seek(offset)
                while offset < entry.size:
                    if self.cancelled.is_set():
                        raise CheckpointError(f"pull of {self.ref} was cancelled")
                    chunk = src.read(min(CHUNK, entry.size - offset))
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    offset += len(chunk)
                    fetched += len(chunk)
                    self.progress.advance(entry.path, len(chunk))
        except FileNotFoundError:
            raise CheckpointError(
                f"{entry.path} of {self.ref} is in the manifest but missing from {self.source.uri}; "
                "the source version is incomplete", param="checkpoint",
            ) from None
        finally:  # counted even when interrupted: the bytes are on disk for the next attempt
            with self.lock:
                self.result.downloaded_bytes += fetched
                self.result.resumed_bytes += resumed
        if offset < entry.size:
            return f"source ended at {offset} of {entry.size} bytes (truncated)"
        if digest.hexdigest() != entry.sha256:
            return f"sha256 {digest.hexdigest()[:12]}..., manifest says {entry.sha256[:12]}... (corrupted)"
        self._record("fetched", entry.path)
        return ""


def pull_checkpoint(
    source: CheckpointStore,
    ref: CheckpointRef,
    cache: CheckpointStore,
    *,
    files: Iterable[str] | None = None,
    workers: int = 4,
    retries: int = 1,
    progress: PullProgress | None = None,
) -> PullResult:
    """Bring ``ref`` from ``source`` into the local ``cache``; only ``files`` when given.

    Returns what was fetched, resumed, reused and already present. Raises ``CheckpointError``
    when a file cannot be fetched intact; files already verified stay for the next attempt.
    """
    progress = progress or NullProgress()
    manifest = source.manifest(ref)
    dest = cache.local_path(ref)
    with version_lock(cache, ref):
        if cache.has(ref):
            cached = cache.manifest(ref)
            if {f.path: f.sha256 for f in cached.files} != {f.path: f.sha256 for f in manifest.files}:
                raise CheckpointError(
                    f"{ref} in the cache {cache.uri!r} differs from {ref} in {source.uri!r}; versions are "
                    f"immutable: remove the cached one (m-ai checkpoint remove {ref}) or pull another version",
                    param="checkpoint",
                )
        wanted = list(manifest.files)
        if files is not None:
            names = set(files)
            unknown = sorted(names - {f.path for f in wanted})
            if unknown:
                raise CheckpointError(f"files {unknown} are not in {ref}", param="files")
            wanted = [f for f in wanted if f.path in names]
        dest.mkdir(parents=True, exist_ok=True)
        result = PullResult(ref, dest, manifest)
        puller = _Puller(source, manifest, cache, progress, retries, result)
        progress.start(ref, sum(f.size for f in wanted), len(wanted))
        try:
            _run_parallel(puller, sorted(wanted, key=lambda f: -f.size), workers)
        finally:
            _write_stamps(dest, puller.stamps)
            progress.finish()
        result.complete = all((dest / f.path).is_file() for f in manifest.files)
        if result.complete and not cache.has(ref):
            cache.write_manifest(replace(manifest, source=source.ref_uri(ref)))
            shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)
    log.info(
        "pulled checkpoint",
        extra={"ref": str(ref), "source": source.uri, "downloaded_bytes": result.downloaded_bytes,
               "resumed_bytes": result.resumed_bytes, "reused_files": len(result.reused),
               "present_files": len(result.present), "complete": result.complete},
    )
    return result


def _run_parallel(puller: _Puller, entries: list[FileEntry], workers: int) -> None:
    if not entries:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(entries))), thread_name_prefix="m-ai-pull") as pool:
        futures = [pool.submit(puller.fetch, entry) for entry in entries]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            puller.cancelled.set()  # the others stop at their next chunk; partials stay for resume
            for future in futures:
                future.cancel()
            raise
