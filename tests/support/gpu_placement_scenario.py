"""Rank actors in a replica's placement group on a Ray with two logical GPUs (no CUDA needed).

Run by ``test_gpu_placement.py`` in a process of its own (``python -m
tests.integration.gpu_placement_scenario OUT.json``) with its own Ray temp dir, apart from
the shared harness. Ray starts with ``num_gpus=2``: it hands out GPU ids 0 and 1 and sets
``CUDA_VISIBLE_DEVICES`` in each actor as it would on a GPU node. A replica actor in bundle 0
of a STRICT_PACK placement group starts the tensor-parallel rank actors with
``RankGroup.start`` (bundles 1 and 2, one GPU each), exactly as the LLM server does; each
rank reports ``RankActor.describe()``: the GPU Ray gave it, what it sees, and the CUDA index
``engine.rank.devices.choose_device`` picks (the one ``TPWorker.load`` applies). Written as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(out: str) -> None:
    temp_dir = tempfile.mkdtemp(prefix="m-ai-gpu-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["PYTHONPATH"] = str(REPO_ROOT)
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    for attempt in range(3):  # Ray gives its raylet 30 s to register: a loaded machine may need more
        try:
            ray.init(
                address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
                _temp_dir=temp_dir, log_to_driver=False,
            )
            break
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
    try:
        pg = placement_group(
            [{"CPU": 0.1}, {"CPU": 0.25, "GPU": 1}, {"CPU": 0.25, "GPU": 1}], strategy="STRICT_PACK"
        )
        ray.get(pg.ready(), timeout=60)

        @ray.remote(num_cpus=0.1)
        class Replica:
            def ranks(self, config_json: str) -> list[dict]:
                from actors.tp.rank_group import RankGroup
                from cluster.config import ModelConfig

                group = RankGroup.start(
                    ModelConfig.model_validate_json(config_json),
                    name_prefix="gpu-placement",
                    engine_cls="engine.fake_engine:FakeEngine",
                    num_cpus=0.25,
                    num_gpus=1.0,
                )
                return ray.get([a.describe.remote() for a in group.actors], timeout=60)

        from cluster.config import ModelConfig

        config = ModelConfig(model_size="tiny", device="cuda", dtype="float16", tp_size=2)
        replica = Replica.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0,
                placement_group_capture_child_tasks=True,
            )
        ).remote()
        ranks = ray.get(replica.ranks.remote(config.model_dump_json()), timeout=120)
        Path(out).write_text(json.dumps({"ranks": ranks, "placement_group": pg.id.hex()}))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
