"""The Ray actor path on one GPU: Ray isolates the GPU, the rank picks cuda:0, and its greedy
output equals the in-process engine's (needs a GPU and Ray)."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ray = pytest.importorskip("ray")

from actors.tp.rank_group import RankGroup  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="m-ai-gpu-ray-")
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield
    ray.shutdown()


def test_a_rank_actor_runs_on_its_ray_gpu_and_matches_the_engine(local_ray, tiny_checkpoint):
    config = ModelConfig(model_size="tiny", checkpoint=str(tiny_checkpoint), device="cuda",
                         dtype="float16", max_num_seqs=4, max_batched_tokens=256,
                         context_length=256, max_tokens=32)
    prompt = [t % 4096 for t in PROMPT]

    async def through_ray() -> tuple[dict, list[int]]:
        group = RankGroup.start(config, name_prefix="gpu-check", num_cpus=1.0, num_gpus=1.0)
        try:
            await group.wait_loaded(timeout_s=300)
            info = await group.rank0.describe.remote()
            tokens: list[int] = []
            async for ref in group.rank0.generate.remote(prompt, GREEDY, "gpu-check-1"):
                tokens += (await ref).token_ids
            await group.rank0.shutdown.remote()
            return info, tokens
        finally:
            group.kill()

    info, tokens = asyncio.run(through_ray())
    assert info["ray_gpu_ids"] and info["cuda_visible_devices"] == info["ray_gpu_ids"][0]
    assert info["cuda_index"] == 0 and info["local_rank"] == 0
    with LLMEngine.from_config(config) as engine:
        want = engine.generate_text(prompt, GREEDY).token_ids
    assert tokens == want and len(tokens) == GREEDY.max_tokens
