"""Chaos: processes killed by pid under load, on the real engine (``make test-chaos``).

Runs ``benchmarks/faults.py`` (one local app: the tiny model at tensor-parallel size 2, sessions
and memory on local disk) with fewer writes and a shorter burst, and holds its figures to the
targets of the benchmark: the memory shard and the session store shard are killed after every
5th acknowledged write, rank 1 and then the model replica are killed while streams run (one
replica: nowhere to resume them), then a burst of requests at 50 concurrent; last, in a second
app with two replicas, the replica that streams a greedy answer is killed and the stream goes on
from the other one (mid-stream migration), identical to the uninterrupted answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("chaos") / "faults.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--out", str(out), "--writes", "10", "--burst", "300",
         "--migrations", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_no_acknowledged_write_is_lost_when_the_memory_and_session_shards_are_killed(faults):
    for kind in ("memories", "sessions"):
        assert faults[kind]["kills"] == 2 and faults[kind]["acknowledged"] == 10, faults[kind]
        assert faults[kind]["lost"] == 0, faults[kind]
    assert faults["sessions"]["stored"] == faults["sessions"]["acknowledged"]


@pytest.mark.parametrize("kill", ["rank_kill", "replica_kill"])
def test_killed_model_processes_end_every_stream_with_a_typed_error(faults, kill):
    scenario = faults[kill]
    assert scenario["hung"] == 0, scenario
    assert scenario["ended_with_error"] == scenario["streams"], scenario


def test_health_tells_the_truth_within_two_seconds_of_a_rank_kill(faults):
    assert faults["health_detect_s"] is not None and faults["health_detect_s"] <= 2.0, faults["rank_kill"]


def test_a_rank_kill_recovers_no_slower_than_a_replica_kill(faults):
    assert faults["rank_vs_replica_recovery"] <= 1.2, (faults["rank_kill"], faults["replica_kill"])


def test_a_burst_gets_no_5xx_other_than_a_designed_503(faults):
    assert faults["burst_http_500"] == 0, faults["burst"]
    assert sum(n for code, n in faults["burst"].items() if code == "200") > 0, faults["burst"]


def test_a_stream_whose_replica_is_killed_goes_on_identical_on_the_other_replica(faults):
    migration = faults["migration"]
    assert migration["n"] == 2 and len(migration["streams"]) == 2, migration
    for stream in migration["streams"]:  # each was under way when its replica was killed
        assert stream["errors"] == 0 and stream["migration_s"] is not None, stream
        assert 0 < stream["chunks_before_kill"] < stream["chunks"], stream
    assert faults["migrated_streams_identical"] == 1.0, migration
