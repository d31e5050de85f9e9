"""Where a checkpoint is, and how it becomes a verified local directory.

A model config's ``checkpoint`` may be:

- a directory in the Hugging Face layout (``/models/llama-2-7b-chat-hf`` or ``file://...``);
  when it holds a ``manifest.json`` its files are verified against it before use;
- a version in a store, ``<store URI>/<name>@<version>`` (``s3://bucket/ckpt/llama-2-7b-chat@v1``,
  ``gs://...``, ``file:///srv/ckpt/...``): pulled into the local cache, verified;
- a bare ``name@version``: a version already in the local cache;
- ``hf://<org>/<repo>[@revision]``: the Hugging Face Hub (online machines; token for gated repos).

``ensure_local`` returns the directory to load, or raises ``CheckpointError``: a file that does
not match its manifest is fetched again when its source is known, and otherwise refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cluster.checkpoints.manifest import (
    MANIFEST_FILE,
    CheckpointManifest,
    CheckpointRef,
    is_ref,
    parse_ref,
)
from cluster.checkpoints.pull import PullProgress, pull_checkpoint, verify_local
from cluster.checkpoints.store import CheckpointStore, FileProblem, split_ref_text, split_ref_uri
from cluster.errors import CheckpointError
from cluster.logging_setup import get_logger

log = get_logger("cluster.checkpoints.resolve")

LocationKind = Literal["directory", "store", "cache", "hub"]
# What a replica needs before its weights (tokenizer, configs): pulled first under lazy loading.
METADATA_SUFFIXES = (".json", ".model", ".txt", ".jinja")


@dataclass(frozen=True)
class CheckpointLocation:
    kind: LocationKind
    directory: Path | None = None
    store_uri: str | None = None
    ref: CheckpointRef | None = None
    repo_id: str | None = None
    revision: str | None = None


def parse_location(value: str) -> CheckpointLocation:
    """Classify a config's ``checkpoint`` value (see the module docstring)."""
    text = value.strip()
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://"):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise CheckpointError(f"checkpoint={value!r}: use hf://ORG/REPO or hf://ORG/REPO@REVISION", param="checkpoint")
        return CheckpointLocation("hub", repo_id=repo, revision=revision or None)
    if "://" in text and not text.startswith("file://"):
        split = split_ref_text(text)
        if split is None:
            raise CheckpointError(
                f"checkpoint={value.split('?')[0]!r} does not end in /NAME@VERSION; remote checkpoints are "
                "versions in a store, e.g. s3://bucket/checkpoints/llama-2-7b-chat@v1",
                param="checkpoint",
            )
        return CheckpointLocation("store", store_uri=split[0], ref=split[1])
    path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    if path.is_dir():
        return CheckpointLocation("directory", directory=path)
    if is_ref(path.name):
        ref = parse_ref(path.name)
        if (path.parent / ref.name / ref.version / MANIFEST_FILE).is_file():
            return CheckpointLocation("store", store_uri=str(path.parent), ref=ref)
        # A bare NAME@VERSION (configs resolve it against the working directory): the cache.
        return CheckpointLocation("cache", ref=ref)
    raise CheckpointError(
        f"checkpoint={value!r} is neither a directory, a store version (URI/NAME@VERSION), a cached "
        "NAME@VERSION nor hf://ORG/REPO; check the path, or make a tiny one with `m-ai checkpoint make-tiny DIR`",
        param="checkpoint",
    )


def _describe(problems: list[FileProblem]) -> str:
    shown = "; ".join(str(p) for p in problems[:3])
    return shown + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _refetch_or_refuse(cache: CheckpointStore, manifest: CheckpointManifest, problems: list[FileProblem],
                       progress: PullProgress | None) -> None:
    try:
        source = split_ref_uri(manifest.source)
    except CheckpointError:
        source = None
    refetch = ""
    if source is not None and source[1] == manifest.ref:
        log.warning("cached checkpoint failed verification; fetching the bad files again",
                    extra={"ref": str(manifest.ref), "problems": _describe(problems)})
        try:
            result = pull_checkpoint(source[0], manifest.ref, cache, progress=progress)
        except CheckpointError as exc:
            refetch = f"; fetching it again from {source[0].uri} failed: {exc.message}"
        else:
            if not verify_local(cache, manifest.ref, quick=True):
                log.info("checkpoint repaired", extra={"ref": str(manifest.ref), "refetched": len(result.refetched)})
                return
    raise CheckpointError(
        f"checkpoint {manifest.ref} at {cache.local_path(manifest.ref)} failed verification ({_describe(problems)})"
        f"{refetch}; it is not loaded: pull it again (m-ai checkpoint pull ...) or remove it "
        f"(m-ai checkpoint remove {manifest.ref})",
        param="checkpoint",
    )


def ensure_local(
    value: str,
    cache_dir: str | Path | None = None,
    *,
    files: Iterable[str] | None = None,
    metadata_only: bool = False,
    progress: PullProgress | None = None,
    token: str | None = None,
    hub_client=None,
) -> Path:
    """The verified local directory of checkpoint ``value``, pulling it into the cache if needed.

    ``metadata_only`` fetches only the small files (configs, tokenizer) of a store version,
    for a replica that loads its weights later (lazy loading); call again without it to
    complete the version.
    """
    location = parse_location(value)
    cache = CheckpointStore.local_cache(cache_dir)
    if location.kind == "directory":
        return _verified_directory(location.directory, progress)
    if location.kind == "hub":
        from cluster.checkpoints.hub import pull_from_hub

        return pull_from_hub(location.repo_id, cache, revision=location.revision, token=token,
                             client=hub_client, progress=progress).path
    ref = location.ref
    if location.kind == "store":
        source = CheckpointStore.from_uri(location.store_uri)
        if source.is_local and Path(source.root) == Path(cache.root):
            return ensure_local(str(ref), cache_dir, progress=progress)
        if metadata_only and not cache.has(ref):
            files = [f.path for f in source.manifest(ref).files if f.path.endswith(METADATA_SUFFIXES)]
        result = pull_checkpoint(source, ref, cache, files=files, progress=progress)
        return result.path
    if not cache.has(ref):
        known = ", ".join(str(m.ref) for m in cache.manifests()) or "none"
        raise CheckpointError(
            f"checkpoint {ref} is not in the local cache {cache.uri!r} (cached: {known}); "
            f"pull it first: m-ai checkpoint pull <store URI>/{ref}",
            param="checkpoint",
        )
    problems = verify_local(cache, ref, quick=True)
    if problems:
        _refetch_or_refuse(cache, cache.manifest(ref), problems, progress)
    return cache.local_path(ref)


def _verified_directory(directory: Path, progress: PullProgress | None) -> Path:
    """A plain directory is used as is; one with a manifest (a store version) is verified first."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return directory
    manifest = CheckpointManifest.from_json(manifest_path.read_text(), where=str(manifest_path))
    if directory.name != manifest.version or directory.parent.name != manifest.name:
        raise CheckpointError(
            f"{directory} holds the manifest of {manifest.ref} but is not laid out as <store>/{manifest.name}/"
            f"{manifest.version}; point checkpoint at the store version instead", param="checkpoint",
        )
    store = CheckpointStore.from_uri(directory.parent.parent)
    problems = verify_local(store, manifest.ref, quick=True)
    if problems:
        _refetch_or_refuse(store, manifest, problems, progress)
    return directory
