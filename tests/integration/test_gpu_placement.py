"""Each tensor-parallel rank actor gets its own GPU from Ray and picks the right CUDA index.

A Ray of its own with two logical GPUs (``gpu_placement_scenario.py``, no CUDA needed): the
rank actors of one tp=2 replica, started in its placement group as the LLM server starts
them, must hold distinct GPUs, see only their own (``CUDA_VISIBLE_DEVICES``), and so use
``cuda:0`` with ``LOCAL_RANK=0``. The old code set ``LOCAL_RANK=rank``: rank 1 asked for
``cuda:1`` in a process that sees one GPU ("invalid device ordinal").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_each_rank_actor_gets_a_distinct_gpu_and_uses_its_only_visible_index(tmp_path):
    out = tmp_path / "gpu_placement.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.support.gpu_placement_scenario", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    ranks = sorted(report["ranks"], key=lambda r: r["rank"])

    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["placement_group_id"] for r in ranks} == {report["placement_group"]}
    gpus = [r["ray_gpu_ids"] for r in ranks]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1]  # one GPU each, distinct
    assert sorted(g[0] for g in gpus) == ["0", "1"]
    for r in ranks:
        assert r["cuda_visible_devices"] == r["ray_gpu_ids"][0]  # Ray's isolation
        assert r["gpu_id"] == r["ray_gpu_ids"][0]
        assert r["cuda_index"] == 0 and r["local_rank"] == 0
