"""Checkpoints from the Hugging Face Hub, by repository id and revision (online machines only).

The hub client is injected (``HubClient``): the default wraps ``huggingface_hub`` (imported
when used), tests pass a fake. Files are listed with their metadata: large files carry the
sha256 of Git LFS, small ones their git blob id, and both are checked after the download. The
result lands in the local cache as ``<name>@<commit[:12]>`` with a manifest like any other
version; files that an older cached version already has are linked, not downloaded.

Llama 2 repositories are gated: accept Meta's licence on the Hub, then pass a token
(``--token`` or the ``HF_TOKEN`` variable, which huggingface_hub reads itself).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cluster.checkpoints.manifest import (
    CheckpointManifest,
    CheckpointRef,
    FileEntry,
    parse_ref,
    sha256_file,
)
from cluster.checkpoints.pull import (
    PARTIAL_DIR,
    NullProgress,
    PullProgress,
    PullResult,
    _read_stamps,
    _stamp,
    _write_stamps,
    version_lock,
)
from cluster.checkpoints.store import CheckpointStore
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("cluster.checkpoints.hub")

# Safetensors weights, configs and the SentencePiece model; not the duplicate *.bin weights.
DEFAULT_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model")


class HubClient(Protocol):
    """The two calls M-AI makes to the Hub (``huggingface_hub.HfApi`` signatures)."""

    def model_info(self, repo_id: str, *, revision: str | None, files_metadata: bool, token: str | None) -> Any: ...

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str, local_dir: str, token: str | None) -> str: ...


class _HuggingFaceHub:
    """``HubClient`` over the real ``huggingface_hub`` package."""

    def __init__(self) -> None:
        import huggingface_hub

        self._hub = huggingface_hub
        self._api = huggingface_hub.HfApi()

    def model_info(self, repo_id, *, revision, files_metadata, token):
        return self._api.model_info(repo_id, revision=revision, files_metadata=files_metadata, token=token)

    def hf_hub_download(self, repo_id, filename, *, revision, local_dir, token):
        return self._hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=local_dir, token=token)


def default_hub_client() -> HubClient:
    return _HuggingFaceHub()


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # Git LFS files
    blob_id: str | None  # git blob sha1 of small files


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content (what the Hub lists for non-LFS files)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_error(exc: Exception, repo_id: str, revision: str | None) -> CheckpointError:
    kind = type(exc).__name__
    where = f"{repo_id}@{revision or 'main'}"
    if kind == "GatedRepoError" or "401" in str(exc) or "403" in str(exc):
        return CheckpointError(
            f"{where} on the Hugging Face Hub is gated: accept the licence on its page, then pass a token "
            "(--token or HF_TOKEN) of an account that has access",
            param="checkpoint",
        )
    if kind in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"):
        return CheckpointError(f"{where} was not found on the Hugging Face Hub ({kind}); check the id and revision",
                               param="checkpoint")
    return CheckpointError(
        f"cannot reach the Hugging Face Hub for {where}: {kind}: {exc}; this machine may be offline — "
        "pull the checkpoint where it is online and publish it to a store (s3://, gs://, a directory)",
        param="checkpoint",
    )


def list_hub_files(info: Any, patterns: tuple[str, ...]) -> list[HubFile]:
    out = []
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        lfs = getattr(sibling, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        size = getattr(sibling, "size", None)
        if size is None and lfs:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        out.append(HubFile(name, int(size or 0), sha, getattr(sibling, "blob_id", None)))
    return out


def hub_name(repo_id: str) -> str:
    """A catalog name for a repository: ``meta-llama/Llama-2-7b-chat-hf`` -> ``llama-2-7b-chat-hf``."""
    return parse_ref(f"{repo_id.rsplit('/', 1)[-1].lower()}@x").name


def pull_from_hub(
    repo_id: str,
    cache: CheckpointStore,
    *,
    revision: str | None = None,
    name: str | None = None,
    token: str | None = None,
    client: HubClient | None = None,
    patterns: tuple[str, ...] = DEFAULT_PATTERNS,
    retries: int = 1,
    progress: PullProgress | None = None,
) -> PullResult:
    """Download ``repo_id`` at ``revision`` into ``cache`` as ``<name>@<commit[:12]>``, verified."""
    client = client or default_hub_client()
    progress = progress or NullProgress()
    try:
        info = client.model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except Exception as exc:  # the hub's own errors, network errors: all reported the same way
        raise _hub_error(exc, repo_id, revision) from None
    commit = info.sha
    ref = CheckpointRef(name or hub_name(repo_id), commit[:12])
    files = list_hub_files(info, patterns)
    if not any(f.path.endswith(".safetensors") for f in files):
        raise CheckpointError(f"{repo_id}@{revision or 'main'} has no *.safetensors weights; M-AI loads safetensors only",
                              param="checkpoint")
    dest = cache.local_path(ref)
    result = PullResult(ref, dest, CheckpointManifest(ref.name, ref.version, f"hf://{repo_id}@{commit}", time.time()))
    with version_lock(cache, ref):
        if cache.has(ref):
            result.manifest = cache.manifest(ref)
            result.present = [f.path for f in result.manifest.files]
            result.complete = True
            return result
        staging = dest / PARTIAL_DIR / "hub"
        staging.mkdir(parents=True, exist_ok=True)
        reusable = _cached_by_sha256(cache, ref)
        stamps = _read_stamps(dest)
        entries = []
        progress.start(ref, sum(f.size for f in files), len(files))
        try:
            for hub_file in files:
                entries.append(_fetch_hub_file(client, repo_id, commit, hub_file, dest, staging, token,
                                               reusable, stamps, retries, result, progress))
        finally:
            _write_stamps(dest, stamps)
            progress.finish()
        manifest = CheckpointManifest(ref.name, ref.version, f"hf://{repo_id}@{commit}", time.time(), tuple(entries))
        cache.write_manifest(manifest)
        shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)
    result.manifest, result.complete = manifest, True
    log.info("pulled from the hub", extra={"repo": repo_id, "ref": str(ref), "downloaded_bytes": result.downloaded_bytes,
                                          "reused_files": len(result.reused)})
    return result


def _cached_by_sha256(cache: CheckpointStore, ref: CheckpointRef) -> dict[str, Path]:
    out = {}
    for manifest in cache.manifests():
        if manifest.ref != ref:
            for entry in manifest.files:
                out.setdefault(entry.sha256, cache.local_path(manifest.ref) / entry.path)
    return out


def _fetch_hub_file(client, repo_id, commit, hub_file: HubFile, dest: Path, staging: Path, token, reusable,
                    stamps, retries, result: PullResult, progress: PullProgress) -> FileEntry:
    final = dest / hub_file.path
    final.parent.mkdir(parents=True, exist_ok=True)
    if hub_file.sha256 and hub_file.sha256 in reusable and reusable[hub_file.sha256].is_file():
        src = reusable[hub_file.sha256]
        final.unlink(missing_ok=True)
        try:
            os.link(src, final)
        except OSError:
            shutil.copyfile(src, final)
        if sha256_file(final) == hub_file.sha256:
            stamps[hub_file.path] = _stamp(final)
            result.reused.append(hub_file.path)
            progress.advance(hub_file.path, hub_file.size)
            return FileEntry(hub_file.path, final.stat().st_size, hub_file.sha256)
        final.unlink()
    problem = ""
    for _attempt in range(1 + retries):
        try:
            got = Path(client.hf_hub_download(repo_id, hub_file.path, revision=commit, local_dir=str(staging), token=token))
        except Exception as exc:
            raise _hub_error(exc, repo_id, commit) from None
        problem = _check_hub_file(got, hub_file)
        if not problem:
            digest = hub_file.sha256 or sha256_file(got)
            got.chmod(0o444)
            os.replace(got, final)
            stamps[hub_file.path] = _stamp(final)
            result.fetched.append(hub_file.path)
            result.downloaded_bytes += final.stat().st_size
            progress.advance(hub_file.path, final.stat().st_size)
            return FileEntry(hub_file.path, final.stat().st_size, digest)
        got.unlink(missing_ok=True)
        log.warning("hub download failed verification", extra={"file": hub_file.path, "reason": problem})
    raise CheckpointError(
        f"{hub_file.path} of {repo_id}@{commit[:12]}: {problem} after {1 + retries} attempts; refusing it",
        param="checkpoint",
    )


def _check_hub_file(path: Path, hub_file: HubFile) -> str:
    size = path.stat().st_size
    if hub_file.size and size != hub_file.size:
        return f"size {size}, the hub lists {hub_file.size} (truncated)"
    if hub_file.sha256:
        digest = sha256_file(path)
        return "" if digest == hub_file.sha256 else f"sha256 {digest[:12]}..., the hub lists {hub_file.sha256[:12]}..."
    if hub_file.blob_id:
        blob = git_blob_id(path)
        return "" if blob == hub_file.blob_id else f"git blob {blob[:12]}..., the hub lists {hub_file.blob_id[:12]}..."
    return ""
