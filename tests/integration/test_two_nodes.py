"""Two (here three) worker nodes on one machine: replicas spread across nodes, and a node
removed in the middle of traffic leaves the application serving while Serve places its
replica again. The cluster runs in a process and Ray temp dir of its own
(``two_node_scenario.py``), apart from the shared harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_removed_node_leaves_the_app_serving_and_its_replica_is_placed_again(tmp_path):
    out = tmp_path / "two_nodes.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.support.two_node_scenario", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())

    workers = set(report["worker_nodes"])
    before = report["replica_nodes_before"]
    after = report["replica_nodes_after"]
    # spread: one replica per worker node (each node has room for one), none on the head
    assert len(before) == 2 and len(set(before.values())) == 2
    assert set(before.values()) <= workers
    removed = report["removed_node"]
    assert removed in before.values() and removed not in report["ingress_nodes"]
    # placed again: two replicas, on live worker nodes, the survivor untouched
    assert len(after) == 2 and removed not in after.values()
    assert set(after.values()) <= workers - {removed}
    survivor = next(name for name, node in before.items() if node != removed)
    assert after[survivor] == before[survivor]

    # served throughout: every request answered (none hung past the client timeout),
    # never a 500, and most of those sent after the removal succeeded
    requests = report["requests"]
    statuses = Counter(status for _, status in requests)
    assert statuses[0] == 0 and not any(500 <= s < 600 and s != 503 for s in statuses)
    during = [s for t, s in requests if report["removed_at"] <= t <= report["replaced_at"]]
    after_removal = [s for t, s in requests if t >= report["removed_at"]]
    assert during and after_removal.count(200) >= 0.8 * len(after_removal), statuses
