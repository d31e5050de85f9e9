"""Checkpoints in an S3-compatible store on loopback (moto's server mode, started here).

Publish the tiny checkpoint to S3, pull it (verified, parallel), survive a corrupted object,
an interrupted download and an incremental update, and serve a model straight from an
``s3://`` checkpoint URI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("moto")

import pyarrow.fs as pafs  # noqa: E402

from cluster.checkpoints import pull as checkpoint_pull  # noqa: E402
from cluster.checkpoints.manifest import parse_ref  # noqa: E402
from cluster.checkpoints.pull import PARTIAL_DIR, pull_checkpoint, verify_local  # noqa: E402
from cluster.checkpoints.store import CheckpointStore  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.errors import CheckpointError  # noqa: E402
from cluster.net import free_port

BUCKET = "m-ai-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
V1, V2 = parse_ref("tiny@v1"), parse_ref("tiny@v2")



@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, stopped by its PID when the module ends."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # pyarrow reads credentials from the environment
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (exit code {proc.poll()})")
                time.sleep(0.2)
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                         allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_store(s3_endpoint, request) -> CheckpointStore:
    prefix = request.node.name.replace("[", "-").replace("]", "")
    return CheckpointStore.from_uri(f"s3://{BUCKET}/{prefix}?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1")


@pytest.fixture
def published(s3_store, tiny_checkpoint) -> CheckpointStore:
    s3_store.publish(tiny_checkpoint, V1)
    return s3_store


def overwrite_object(store: CheckpointStore, ref, rel: str, data: bytes) -> None:
    with store.fs.open_output_stream(store.file_path(ref, rel)) as out:
        out.write(data)


def test_publish_and_pull_through_s3(published, tiny_checkpoint, tmp_path):
    assert published.versions("tiny") == ["v1"]
    assert "testing" not in published.ref_uri(V1)  # no credentials in recorded URIs
    cache = CheckpointStore.local_cache(tmp_path / "cache")
    result = pull_checkpoint(published, V1, cache, workers=4)
    assert result.complete and result.downloaded_bytes == published.manifest(V1).total_bytes
    for entry in published.manifest(V1).files:
        assert (result.path / entry.path).read_bytes() == (tiny_checkpoint / entry.path).read_bytes()
    assert published.verify(V1) == []


def test_a_corrupted_object_is_refused_then_fixed_by_republishing(published, tiny_checkpoint, tmp_path):
    cache = CheckpointStore.local_cache(tmp_path / "cache")
    good = (tiny_checkpoint / "model.safetensors").read_bytes()
    overwrite_object(published, V1, "model.safetensors", good[:1000] + b"\x00" * 64 + good[1064:])
    assert [p.path for p in published.verify(V1)] == ["model.safetensors"]
    with pytest.raises(CheckpointError, match="model.safetensors of tiny@v1 .*corrupted"):
        pull_checkpoint(published, V1, cache)
    assert not cache.has(V1) and not (cache.local_path(V1) / "model.safetensors").exists()
    # the loader refuses it as well: the version never became complete in the cache
    with pytest.raises(CheckpointError):
        from engine.rank.loader import resolve_checkpoint

        resolve_checkpoint(ModelConfig(checkpoint=published.ref_uri(V1), checkpoint_cache_dir=str(cache.root)))
    overwrite_object(published, V1, "model.safetensors", good)
    result = pull_checkpoint(published, V1, cache)
    assert result.complete and "model.safetensors" in result.fetched
    assert len(result.present) == len(published.manifest(V1).files) - 1  # the good files stayed


def test_an_interrupted_download_resumes_with_ranged_reads(published, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_pull, "CHUNK", 1 << 20)
    cache = CheckpointStore.local_cache(tmp_path / "cache")
    total = published.manifest(V1).total_bytes

    class Disconnect:
        seen = 0

        def start(self, ref, total_bytes, files):
            pass

        def advance(self, path, nbytes):
            self.seen += nbytes
            if path == "model.safetensors" and self.seen > total // 3:
                raise ConnectionResetError("network dropped")

        def finish(self):
            pass

    with pytest.raises(ConnectionResetError):
        pull_checkpoint(published, V1, cache, workers=1, progress=Disconnect())
    partial = cache.local_path(V1) / PARTIAL_DIR / "model.safetensors"
    kept = partial.stat().st_size  # the largest file goes first; the others were not started
    assert 0 < kept < published.manifest(V1).file("model.safetensors").size
    result = pull_checkpoint(published, V1, cache, workers=2)
    assert result.complete and result.resumed_bytes == kept
    assert result.downloaded_bytes == total - kept
    assert verify_local(cache, V1) == []


def test_an_incremental_update_fetches_only_changed_files(published, tiny_checkpoint, tmp_path):
    cache = CheckpointStore.local_cache(tmp_path / "cache")
    pull_checkpoint(published, V1, cache)
    newer = tmp_path / "tiny-v2"
    shutil.copytree(tiny_checkpoint, newer)
    generation = json.loads((newer / "generation_config.json").read_text())
    (newer / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.2}))
    published.publish(newer, V2)
    result = pull_checkpoint(published, V2, cache)
    assert result.fetched == ["generation_config.json"]
    assert result.downloaded_bytes == (newer / "generation_config.json").stat().st_size
    assert "model.safetensors" in result.reused
    assert cache.versions("tiny") == ["v1", "v2"] and published.versions("tiny") == ["v1", "v2"]
    published.remove(V1)
    assert published.versions("tiny") == ["v2"] and published.verify(V2) == []  # in-store copies


def test_serving_from_an_s3_checkpoint_uri(published, tmp_path):
    from engine.engine import LLMEngine
    from engine.types import SamplingParams

    cfg = ModelConfig(model_size="tiny", checkpoint=published.ref_uri(V1), checkpoint_cache_dir=str(tmp_path / "cache"),
                      dtype="float32", device="cpu", max_num_seqs=2, max_batched_tokens=64, context_length=128,
                      max_tokens=16)
    with LLMEngine.from_config(cfg) as engine:
        out = engine.generate_text("Hello", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 8
    assert Path(tmp_path / "cache" / "tiny" / "v1" / "manifest.json").is_file()
