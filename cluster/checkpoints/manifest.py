"""Checkpoint manifests: what one version of a checkpoint is, file by file.

A manifest names a checkpoint version (``name@version``), where it came from, when it was made,
and each file with its size and sha256. It is stored as ``manifest.json`` next to the files
and written last, so a directory with a manifest is complete; a reader trusts nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK = 8 << 20
# Names and versions become path components in every store: keep them to a safe alphabet.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_REF_RE = re.compile(rf"^(?P<name>{_PART})@(?P<version>{_PART})$")
# Files of a store that are not part of the checkpoint itself.
_INTERNAL = (MANIFEST_FILE,)


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """``name@version`` of one checkpoint version."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def is_ref(text: str) -> bool:
    return bool(_REF_RE.match(text))


def parse_ref(text: str) -> CheckpointRef:
    """``name@version`` -> ``CheckpointRef``; names and versions use letters, digits, ``._-``."""
    match = _REF_RE.match(text.strip())
    if not match:
        raise CheckpointError(
            f"checkpoint reference {text!r} is not NAME@VERSION (letters, digits, '.', '_', '-'); "
            "e.g. llama-2-7b-chat@v1",
            param="checkpoint",
        )
    return CheckpointRef(match["name"], match["version"])


def safe_version(text: str) -> str:
    """A revision (a branch like ``refs/pr/1`` or a commit) made safe as a version."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "main"
    return cleaned[:128]


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its path relative to the checkpoint root, size and sha256."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        parts = Path(self.path).parts
        if not parts or self.path.startswith("/") or ".." in parts or "\\" in self.path:
            raise CheckpointError(f"manifest file path {self.path!r} must be relative, without '..'")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise CheckpointError(f"manifest file {self.path!r} has sha256={self.sha256!r}; need 64 hex digits")


@dataclass(frozen=True)
class CheckpointManifest:
    """A checkpoint version: ``name@version``, its source URI, created time and files."""

    name: str
    version: str
    source: str
    created: float
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    format: int = MANIFEST_FORMAT

    @property
    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.name, self.version)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_json(self) -> str:
        data = asdict(self)
        data["created_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> CheckpointManifest:
        try:
            data = json.loads(text)
            if data.get("format", MANIFEST_FORMAT) > MANIFEST_FORMAT:
                raise CheckpointError(
                    f"{where} has format {data['format']}, newer than this M-AI reads ({MANIFEST_FORMAT}); upgrade M-AI"
                )
            files = tuple(FileEntry(f["path"], int(f["size"]), f["sha256"]) for f in data["files"])
            parse_ref(f"{data['name']}@{data['version']}")
            return cls(data["name"], data["version"], data["source"], float(data["created"]), files)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where} is not a valid checkpoint manifest: {exc!r}") from None


def sha256_stream(read: Callable[[int], bytes], on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of everything ``read(n)`` returns until it returns b''."""
    digest = hashlib.sha256()
    while chunk := read(HASH_CHUNK):
        digest.update(chunk)
        if on_bytes:
            on_bytes(len(chunk))
    return digest.hexdigest()


def sha256_file(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle.read, on_bytes)


def checkpoint_files(root: Path) -> list[str]:
    """Relative paths of the files of a local checkpoint directory (hidden and internal excluded)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts) and str(rel) not in _INTERNAL:
            out.append(rel.as_posix())
    return out


def manifest_from_directory(root: str | Path, ref: CheckpointRef, source: str | None = None) -> CheckpointManifest:
    """Hash every file of the local directory ``root`` into a manifest for ``ref``."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist", param="checkpoint")
    entries = tuple(FileEntry(rel, (root / rel).stat().st_size, sha256_file(root / rel)) for rel in checkpoint_files(root))
    if not entries:
        raise CheckpointError(f"checkpoint directory {str(root)!r} holds no files", param="checkpoint")
    return CheckpointManifest(ref.name, ref.version, source or root.resolve().as_uri(), time.time(), entries)


@dataclass(frozen=True)
class ManifestDiff:
    """How a new version differs from an old one, by content."""

    unchanged: tuple[str, ...]
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]


def diff_manifests(old: CheckpointManifest, new: CheckpointManifest) -> ManifestDiff:
    before = {f.path: f.sha256 for f in old.files}
    after = {f.path: f.sha256 for f in new.files}
    return ManifestDiff(
        unchanged=tuple(p for p in after if before.get(p) == after[p]),
        changed=tuple(p for p in after if p in before and before[p] != after[p]),
        added=tuple(p for p in after if p not in before),
        removed=tuple(p for p in before if p not in after),
    )


def index_by_hash(manifests: Iterable[CheckpointManifest]) -> dict[str, tuple[CheckpointManifest, FileEntry]]:
    """sha256 -> (a manifest holding it, its entry): where an identical file already exists."""
    out: dict[str, tuple[CheckpointManifest, FileEntry]] = {}
    for manifest in manifests:
        for entry in manifest.files:
            out.setdefault(entry.sha256, (manifest, entry))
    return out
