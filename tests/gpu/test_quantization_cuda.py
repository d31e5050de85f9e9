"""8-bit and 4-bit weights on CUDA through the same loader path as the CPU (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

from cluster.catalog import architecture  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.planner import PlanRequest, local_machine, plan_deployment  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.rank.loader import load_model, model_weight_bytes  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def config(checkpoint, **overrides) -> ModelConfig:
    fields = dict(model_size="tiny", checkpoint=str(checkpoint), dtype="float16", device="cuda",
                  max_num_seqs=4, max_batched_tokens=256, context_length=256, max_tokens=32)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_weights_live_on_the_gpu_and_shrink(tiny_checkpoint, quantization):
    torch.cuda.set_device(0)
    model = load_model(config(tiny_checkpoint, quantization=quantization), tiny_checkpoint)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.device.type == "cuda"
    assert isinstance(q_proj, bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit)
    arch = architecture("tiny")
    predicted = arch.weight_bytes("float16", quantization)
    assert predicted <= model_weight_bytes(model)["total"] <= predicted + 64 * 7 * arch.num_hidden_layers


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_logits_close_to_fp16_on_cuda(tiny_checkpoint, quantization):
    torch.cuda.set_device(0)
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    dense = load_model(config(tiny_checkpoint), tiny_checkpoint)
    quantized = load_model(config(tiny_checkpoint, quantization=quantization), tiny_checkpoint)
    with torch.no_grad():
        want, got = dense(ids).logits.float(), quantized(ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < {"8bit": 0.25, "4bit": 0.9}[quantization]  # the CPU test's bounds (tests/unit)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_greedy_decoding_through_the_engine_on_cuda(tiny_checkpoint, quantization):
    with LLMEngine.from_config(config(tiny_checkpoint, quantization=quantization)) as engine:
        first = engine.generate_text("Hello there, how are you today?", GREEDY)
        second = engine.generate_text("Hello there, how are you today?", GREEDY)
    assert len(first.token_ids) == GREEDY.max_tokens and first.token_ids == second.token_ids


def test_the_planner_sees_this_gpu_and_its_plan_loads():
    machine = local_machine()
    assert machine.has_gpus and machine.gpu_memory_gib > 1
    plan = plan_deployment(machine, PlanRequest("tiny", context_length=2048))
    assert plan.device == "cuda" and plan.tp_size == 1
    ModelConfig(model_size="tiny", **plan.model_config_fields())
