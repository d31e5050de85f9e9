"""Checkpoint versions in a local-directory store: manifests, verified and resumable pulls,
corruption, incremental updates, the cache the loader reads, the Hub path (fake client), the CLI."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cluster.checkpoints import pull as checkpoint_pull
from cluster.checkpoints.hub import git_blob_id, pull_from_hub
from cluster.checkpoints.manifest import (
    MANIFEST_FILE,
    CheckpointManifest,
    diff_manifests,
    parse_ref,
)
from cluster.checkpoints.pull import PARTIAL_DIR, pull_checkpoint, verify_local
from cluster.checkpoints.resolve import ensure_local, parse_location
from cluster.checkpoints.store import CheckpointStore, split_ref_text
from cluster.errors import CheckpointError

V1, V2 = parse_ref("toy@v1"), parse_ref("toy@v2")


def write_checkpoint(directory: Path, seed: int = 0, changed: tuple[str, ...] = ()) -> Path:
    """A fake checkpoint: three weight files of ~100 KB and two small JSON files."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        name = f"model-{i:05d}-of-00003.safetensors"
        data = hashlib.sha256(f"{seed}-{i}-{name in changed}".encode()).digest() * 3000
        (directory / name).write_bytes(data + bytes([i]) * (i * 777))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    store = CheckpointStore.from_uri(tmp_path / "store")
    store.publish(write_checkpoint(tmp_path / "src-v1"), V1)
    return store


@pytest.fixture
def cache(tmp_path) -> CheckpointStore:
    return CheckpointStore.local_cache(tmp_path / "cache")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(checkpoint_pull, "CHUNK", 4096)


def corrupt(path: Path, offset: int = 1000) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- manifests and stores ----------------------------------------------------------------------


def test_publish_writes_files_and_a_manifest_with_sizes_and_hashes(store, tmp_path):
    manifest = store.manifest(V1)
    src = tmp_path / "src-v1"
    assert {f.path for f in manifest.files} == {p.name for p in src.iterdir()}
    for entry in manifest.files:
        assert entry.size == (src / entry.path).stat().st_size
        assert entry.sha256 == sha256(src / entry.path)
    assert manifest.source == src.resolve().as_uri() and manifest.created > 0
    assert (Path(store.version_dir(V1)) / MANIFEST_FILE).is_file()
    assert CheckpointManifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(CheckpointError, match="immutable"):
        store.publish(src, V1)


@pytest.mark.parametrize("bad", ["toy", "toy@", "@v1", "../x@v1", "toy@v1/x", "to y@v1"])
def test_references_are_name_at_version(bad):
    with pytest.raises(CheckpointError, match="NAME@VERSION"):
        parse_ref(bad)


def test_store_lists_versions_and_removes_one(store, tmp_path):
    store.publish(write_checkpoint(tmp_path / "src-v2", seed=1), V2)
    assert store.names() == ["toy"] and store.versions("toy") == ["v1", "v2"]
    store.remove(V1)
    assert store.versions("toy") == ["v2"] and not Path(store.version_dir(V1)).exists()
    with pytest.raises(CheckpointError, match="versions of toy: toy@v2"):
        store.manifest(V1)


def test_a_version_without_manifest_is_not_listed(store, tmp_path):
    half = Path(store.root) / "toy" / "v9"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert store.versions("toy") == ["v1"]


def test_ref_uris_split_back_into_store_and_ref(store):
    uri = store.ref_uri(V1)
    assert split_ref_text(uri) == (Path(store.root).as_uri(), V1)
    s3 = "s3://bucket/ckpt/toy@v1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert split_ref_text(s3) == ("s3://bucket/ckpt?endpoint_override=127.0.0.1:9000&scheme=http", V1)
    assert split_ref_text("s3://toy@v1") is None
    assert parse_location("hf://meta-llama/Llama-2-7b-hf@main").repo_id == "meta-llama/Llama-2-7b-hf"
    assert parse_location("toy@v1").kind == "cache"


# -- pulling ----------------------------------------------------------------------------------


def test_pull_verifies_and_places_every_file(store, cache, tmp_path):
    result = pull_checkpoint(store, V1, cache, workers=3)
    assert result.complete and sorted(result.fetched) == sorted(f.path for f in store.manifest(V1).files)
    assert result.downloaded_bytes == store.manifest(V1).total_bytes
    for entry in store.manifest(V1).files:
        assert sha256(result.path / entry.path) == entry.sha256
    assert not (result.path / PARTIAL_DIR).exists()
    assert cache.manifest(V1).source == store.ref_uri(V1)
    again = pull_checkpoint(store, V1, cache)
    assert again.downloaded_bytes == 0 and len(again.present) == len(store.manifest(V1).files)


def test_corrupted_source_file_is_refused_and_never_placed(store, cache):
    bad = Path(store.version_dir(V1)) / "model-00001-of-00003.safetensors"
    corrupt(bad)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003.safetensors of toy@v1 .*corrupted.*refused"):
        pull_checkpoint(store, V1, cache, retries=1)
    dest = cache.local_path(V1)
    assert not (dest / "model-00001-of-00003.safetensors").exists()
    assert not cache.has(V1)  # no manifest: nothing may load it
    with pytest.raises(CheckpointError, match="not in the local cache"):
        ensure_local("toy@v1", cache.root)


def test_truncated_source_file_is_refused(store, cache):
    bad = Path(store.version_dir(V1)) / "model-00002-of-00003.safetensors"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        pull_checkpoint(store, V1, cache, retries=0)


def test_an_interrupted_pull_resumes_where_it_stopped(store, cache, small_chunks):
    total = store.manifest(V1).total_bytes

    class StopHalfway:
        seen = 0

        def start(self, ref, total_bytes, files):
            pass

        def advance(self, path, nbytes):
            self.seen += nbytes
            if self.seen > total // 2:
                raise KeyboardInterrupt("connection lost")

        def finish(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        pull_checkpoint(store, V1, cache, workers=1, progress=StopHalfway())
    partials = list((cache.local_path(V1) / PARTIAL_DIR).rglob("*"))
    assert partials and not cache.has(V1)
    resumed = pull_checkpoint(store, V1, cache, workers=2)
    assert resumed.complete and resumed.resumed_bytes > 0
    assert resumed.downloaded_bytes < total
    assert verify_local(cache, V1) == []


def test_a_corrupted_partial_file_is_fetched_again(store, cache, small_chunks):
    name = "model-00000-of-00003.safetensors"
    partial = cache.local_path(V1) / PARTIAL_DIR / name
    partial.parent.mkdir(parents=True)
    good = (Path(store.version_dir(V1)) / name).read_bytes()
    partial.write_bytes(b"\0" * 5000 + good[5000:20000])  # right length so far, wrong bytes
    result = pull_checkpoint(store, V1, cache, retries=1)
    assert result.complete and sha256(cache.local_path(V1) / name) == sha256(Path(store.version_dir(V1)) / name)


def test_incremental_update_fetches_only_changed_files(store, cache, tmp_path):
    pull_checkpoint(store, V1, cache)
    changed = "model-00002-of-00003.safetensors"
    store.publish(write_checkpoint(tmp_path / "src-v2", changed=(changed,)), V2)
    diff = diff_manifests(store.manifest(V1), store.manifest(V2))
    assert diff.changed == (changed,) and not diff.added and not diff.removed
    result = pull_checkpoint(store, V2, cache)
    assert result.fetched == [changed]
    assert sorted(result.reused) == sorted(diff.unchanged)
    assert result.downloaded_bytes == store.manifest(V2).file(changed).size
    assert cache.versions("toy") == ["v1", "v2"]  # the old version is kept
    cache.remove(V1)
    assert verify_local(cache, V2) == []  # shared (linked) files survive removing v1


def test_concurrent_pulls_of_one_version_download_it_once(store, cache):
    results, errors = [], []

    def pull():
        try:
            results.append(pull_checkpoint(store, V1, cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.downloaded_bytes for r in results) == store.manifest(V1).total_bytes


# -- the cache the loader reads ---------------------------------------------------------------


def test_ensure_local_pulls_a_store_version_and_checks_a_cached_one(store, cache):
    path = ensure_local(store.ref_uri(V1), cache.root)
    assert path == cache.local_path(V1) and cache.has(V1)
    assert ensure_local("toy@v1", cache.root) == path
    assert ensure_local(str(path), cache.root) == path  # the version directory itself


def test_a_cached_file_corrupted_later_is_fetched_again_from_its_source(store, cache):
    path = ensure_local(store.ref_uri(V1), cache.root)
    corrupt(path / "model-00001-of-00003.safetensors")
    assert verify_local(cache, V1, quick=True)  # the changed mtime forces a re-hash
    assert ensure_local("toy@v1", cache.root) == path
    assert verify_local(cache, V1) == []


def test_a_corrupted_cached_file_without_reachable_source_is_refused(store, cache):
    path = ensure_local(store.ref_uri(V1), cache.root)
    store.remove(V1)
    (path / "config.json").chmod(0o644)
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match=r"toy@v1 .*failed verification.*config.json.*not loaded"):
        ensure_local("toy@v1", cache.root)


def test_metadata_only_pull_then_the_rest(store, cache):
    path = ensure_local(store.ref_uri(V1), cache.root, metadata_only=True)
    assert (path / "config.json").is_file() and not list(path.glob("*.safetensors"))
    assert not cache.has(V1)
    ensure_local(store.ref_uri(V1), cache.root)
    assert cache.has(V1) and len(list(path.glob("*.safetensors"))) == 3


# -- Hugging Face Hub (fake client: this machine is offline) -----------------------------------


class FakeHub:
    """Serves a directory as a Hub repository at one commit; can corrupt or gate."""

    def __init__(self, root: Path, commit: str = "a" * 40, gated: bool = False, corrupt_file: str | None = None):
        self.root, self.commit, self.gated, self.corrupt_file = root, commit, gated, corrupt_file
        self.downloads: list[str] = []

    def model_info(self, repo_id, *, revision, files_metadata, token):
        if self.gated and token is None:
            raise type("GatedRepoError", (Exception,), {})("401 Client Error: access to model is restricted")
        siblings = []
        for path in sorted(self.root.iterdir()):
            lfs = {"sha256": sha256(path), "size": path.stat().st_size} if path.suffix == ".safetensors" else None
            blob = None if lfs else git_blob_id(path)
            siblings.append(SimpleNamespace(rfilename=path.name, size=path.stat().st_size, lfs=lfs, blob_id=blob))
        siblings.append(SimpleNamespace(rfilename="pytorch_model.bin", size=10, lfs=None, blob_id="0" * 40))
        return SimpleNamespace(sha=self.commit, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision, local_dir, token):
        assert revision == self.commit  # files come from the listed commit, not a moving branch
        self.downloads.append(filename)
        out = Path(local_dir) / filename
        data = (self.root / filename).read_bytes()
        if filename == self.corrupt_file:
            data = data[:-1] + bytes([data[-1] ^ 1])
        out.write_bytes(data)
        return str(out)


def test_hub_pull_verifies_lfs_hashes_and_git_blob_ids(tmp_path, cache):
    repo = write_checkpoint(tmp_path / "repo")
    hub = FakeHub(repo)
    result = pull_from_hub("meta-llama/Llama-2-7b-chat-hf", cache, revision="main", client=hub)
    assert result.ref == parse_ref("llama-2-7b-chat-hf@" + "a" * 12)
    assert "pytorch_model.bin" not in hub.downloads  # safetensors only
    manifest = cache.manifest(result.ref)
    assert manifest.source == f"hf://meta-llama/Llama-2-7b-chat-hf@{'a' * 40}"
    assert {f.path: f.sha256 for f in manifest.files} == {p.name: sha256(p) for p in repo.iterdir()}
    assert verify_local(cache, result.ref) == []
    hub.commit = "b" * 40  # a new commit with the same weights: only the small files come again
    hub.downloads.clear()
    newer = pull_from_hub("meta-llama/Llama-2-7b-chat-hf", cache, client=hub)
    weights = sorted(p.name for p in repo.glob("*.safetensors"))
    assert sorted(newer.reused) == weights and not set(hub.downloads) & set(weights)
    assert newer.ref.version == "b" * 12 and cache.versions(newer.ref.name) == ["a" * 12, "b" * 12]


def test_hub_pull_refuses_a_corrupted_download(tmp_path, cache):
    hub = FakeHub(write_checkpoint(tmp_path / "repo"), corrupt_file="config.json")
    with pytest.raises(CheckpointError, match="config.json .*git blob.*refusing"):
        pull_from_hub("org/repo", cache, client=hub)
    assert hub.downloads.count("config.json") == 2  # fetched again once, then refused
    assert cache.manifests() == []


def test_gated_hub_repository_asks_for_a_token(tmp_path, cache):
    hub = FakeHub(write_checkpoint(tmp_path / "repo"), gated=True)
    with pytest.raises(CheckpointError, match="gated.*token"):
        pull_from_hub("meta-llama/Llama-2-70b-hf", cache, client=hub)
    assert pull_from_hub("meta-llama/Llama-2-70b-hf", cache, client=hub, token="hf_x").complete


def test_hub_location_goes_through_ensure_local(tmp_path, cache):
    hub = FakeHub(write_checkpoint(tmp_path / "repo"))
    path = ensure_local("hf://org/Some-Model@v1.0", cache.root, hub_client=hub)
    assert (path / "config.json").is_file() and path.parent.name == "some-model"


# -- the CLI ----------------------------------------------------------------------------------


def test_checkpoint_commands(store, tmp_path):
    from deployments.cli.models import checkpoint_app

    runner = CliRunner()
    cache_dir = str(tmp_path / "cli-cache")

    def run(*args):
        return runner.invoke(checkpoint_app, [*args, "--cache", cache_dir])

    pulled = run("pull", store.ref_uri(V1))
    assert pulled.exit_code == 0, pulled.output
    listed = run("list")
    assert listed.exit_code == 0 and "toy@v1" in listed.output
    assert run("verify", "toy@v1").exit_code == 0
    corrupt(Path(cache_dir) / "toy" / "v1" / "model-00000-of-00003.safetensors")
    failed = run("verify", "toy@v1")
    assert failed.exit_code == 1 and "model-00000-of-00003.safetensors" in failed.output
    imported = run("pull", str(tmp_path / "src-v1"), "--as", "toy@local")
    assert imported.exit_code == 0, imported.output
    assert run("remove", "toy@v1", "--yes").exit_code == 0
    left = run("list")
    assert "toy@v1" not in left.output and "toy@local" in left.output
    missing = run("remove", "toy@v1", "--yes")
    assert missing.exit_code == 1 and "toy@v1 is not in store" in " ".join(missing.output.split())
    published = runner.invoke(checkpoint_app, ["publish", str(tmp_path / "src-v1"), "toy@v3", "--store", store.root])
    assert published.exit_code == 0 and store.has(parse_ref("toy@v3"))
    assert runner.invoke(checkpoint_app, ["verify", store.ref_uri(parse_ref("toy@v3"))]).exit_code == 0
