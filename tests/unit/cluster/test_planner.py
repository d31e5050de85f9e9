"""The device planner on typical machines, its fallbacks, its explanations and its table."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from cluster.catalog import GIB, architecture
from cluster.config import ModelConfig
from cluster.errors import ConfigError
from cluster.planner import (
    DevicePlan,
    Machine,
    PlanRequest,
    apply_plan,
    plan_deployment,
    plan_for_config,
    render_plan,
)

ONE_24 = Machine(gpus_per_node=1, gpu_memory_gib=24)
ONE_80 = Machine(gpus_per_node=1, gpu_memory_gib=80)
EIGHT_80 = Machine(gpus_per_node=8, gpu_memory_gib=80)
CPU_24 = Machine(cpu_memory_gib=24, cpu_cores=2)
MACHINES = {"1x24": ONE_24, "1x80": ONE_80, "8x80": EIGHT_80, "cpu": CPU_24}

# What each size gets on each machine: (quantization or None, tp_size or None) or "refused".
# Derived by hand from the sizes (fp16: 7B 12.6 GiB, 13B 24.2 GiB, 70B 128.5 GiB of weights).
EXPECTED = {
    ("tiny", "1x24"): (None, 1), ("tiny", "1x80"): (None, 1), ("tiny", "8x80"): (None, 1), ("tiny", "cpu"): (None, 2),
    ("7B", "1x24"): (None, 1), ("7B", "1x80"): (None, 1), ("7B", "8x80"): (None, None), ("7B", "cpu"): (None, 2),
    ("13B", "1x24"): ("8bit", 1), ("13B", "1x80"): (None, 1), ("13B", "8x80"): (None, None), ("13B", "cpu"): ("8bit", 1),
    ("70B", "1x24"): "refused", ("70B", "1x80"): ("8bit", 1), ("70B", "8x80"): (None, 4), ("70B", "cpu"): "refused",
}


def request(size: str, **overrides) -> PlanRequest:
    fields = dict(model_size=size, context_length=2048 if size == "tiny" else 4096, max_num_seqs=32)
    fields.update(overrides)
    return PlanRequest(**fields)


def check_memory_invariants(plan: DevicePlan, req: PlanRequest) -> None:
    arch = architecture(req.model_size)
    assert plan.max_num_seqs >= 1
    assert plan.kv_budget_bytes_per_rank >= plan.max_num_seqs * req.context_length * plan.kv_bytes_per_token_per_rank
    assert arch.num_attention_heads % plan.tp_size == 0 and arch.num_key_value_heads % plan.tp_size == 0
    if plan.device == "cuda":
        assert plan.tp_size * plan.replicas_per_node <= plan.machine.gpus_per_node
        used = plan.weight_bytes_per_rank + plan.kv_budget_bytes_per_rank + plan.reserved_bytes_per_rank
        assert used <= plan.machine.gpu_memory_gib * GIB
        assert plan.kv_bytes_per_token_per_rank * plan.tp_size == arch.kv_cache_bytes_per_token(plan.dtype)
    else:
        assert plan.replicas_per_node == 1
        assert plan.weight_bytes_per_rank * plan.tp_size <= plan.machine.cpu_memory_gib * GIB
    if plan.quantization:
        assert plan.tp_size == 1


@pytest.mark.parametrize("size", ["tiny", "7B", "13B", "70B"])
@pytest.mark.parametrize("machine_name", list(MACHINES))
def test_every_size_on_typical_machines(size, machine_name):
    machine, req = MACHINES[machine_name], request(size)
    expected = EXPECTED[(size, machine_name)]
    if expected == "refused":
        with pytest.raises(ConfigError) as err:
            plan_deployment(machine, req)
        assert "needs" in err.value.message and "use" in err.value.message
        return
    plan = plan_deployment(machine, req)
    quantization, tp_size = expected
    assert plan.quantization == quantization
    if tp_size is not None:
        assert plan.tp_size == tp_size
    check_memory_invariants(plan, req)
    assert plan.device == ("cuda" if machine.has_gpus else "cpu")
    if quantization or plan.max_num_seqs < req.max_num_seqs:
        assert plan.fallbacks  # whatever was given up is said
    # the plan is a valid model config: device placement follows it
    ModelConfig(model_size=size, **plan.model_config_fields())


def test_eight_gpus_fill_the_node_with_the_fewest_ranks_that_hold_the_batch():
    for size in ("tiny", "7B", "13B", "70B"):
        plan = plan_deployment(EIGHT_80, request(size))
        assert plan.max_num_seqs == 32 and not plan.fallbacks
        assert plan.tp_size * plan.replicas_per_node == 8
        for tp in [tp for tp in architecture(size).valid_tp_sizes(8) if tp < plan.tp_size]:
            with pytest.raises(ConfigError):  # fewer ranks would not have held the whole batch
                plan_deployment(Machine(gpus_per_node=tp, gpu_memory_gib=80), request(size, allow_fallback=False))


def test_the_issue_example_seventy_b_fp16_on_four_24_gib_gpus():
    arch = architecture("70B")
    with pytest.raises(ConfigError) as err:
        plan_deployment(Machine(gpus_per_node=4, gpu_memory_gib=24), request("70B", dtype="float16"))
    message = err.value.message
    assert f"needs {arch.weight_bytes('float16') / GIB:.1f} GiB of weights" in message
    assert "4 x 24 GiB GPUs" in message and "cannot hold it" in message
    assert f"4-bit needs {arch.weight_bytes('float16', '4bit') / GIB:.1f} GiB" in message
    assert "8 GPUs of 24 GiB (tp_size=8)" in message
    assert "quantization=4bit" in message
    # and the advice holds: 8 such GPUs do carry it, and 4-bit fits one 48 GiB GPU
    assert plan_deployment(Machine(gpus_per_node=8, gpu_memory_gib=24), request("70B")).tp_size == 8
    assert plan_deployment(Machine(gpus_per_node=1, gpu_memory_gib=48), request("70B", quantization="4bit")).max_num_seqs >= 1


def test_more_ranks_come_before_quantization():
    plan = plan_deployment(Machine(gpus_per_node=4, gpu_memory_gib=48), request("70B"))
    assert plan.quantization is None and plan.tp_size == 4
    quantized = plan_deployment(Machine(gpus_per_node=4, gpu_memory_gib=48), request("70B", quantization="4bit"))
    assert quantized.tp_size == 1 and quantized.replicas == 4


def test_without_fallback_the_planner_refuses_and_says_how_to_fit(caplog):
    with pytest.raises(ConfigError, match="quantization=8bit"):
        plan_deployment(ONE_24, request("13B", allow_fallback=False))
    with caplog.at_level(logging.WARNING, logger="m_ai.cluster.planner"):
        plan = plan_deployment(ONE_24, request("13B"))
    assert plan.quantization == "8bit"
    logged = [r.getMessage() for r in caplog.records]
    assert any("quantized to 8bit" in m for m in logged)
    assert any("max_num_seqs lowered" in m for m in logged)


def test_smaller_batch_rather_than_quantization_when_the_weights_fit():
    plan = plan_deployment(ONE_24, request("7B"))
    assert plan.quantization is None and 1 <= plan.max_num_seqs < 32
    assert any("would hold" in note for note in plan.notes)  # the alternative is offered
    with pytest.raises(ConfigError, match=f"use max_num_seqs <= {plan.max_num_seqs}"):
        plan_deployment(ONE_24, request("7B", allow_fallback=False))
    exact = plan_deployment(ONE_24, request("7B", allow_fallback=False, max_num_seqs=plan.max_num_seqs))
    assert exact.max_num_seqs == plan.max_num_seqs and not exact.fallbacks


def test_cpu_prefers_bfloat16_to_quantization_and_refuses_float16():
    plan = plan_deployment(CPU_24, request("7B"))
    assert plan.dtype == "bfloat16" and plan.quantization is None
    with pytest.raises(ConfigError, match="dtype='float16'"):
        plan_deployment(CPU_24, request("7B", dtype="float16"))
    big = plan_deployment(Machine(cpu_memory_gib=256, cpu_cores=32), request("7B"))
    assert big.dtype == "float32" and big.tp_size == 8 and big.max_num_seqs == 32
    single = plan_deployment(Machine(cpu_memory_gib=64, cpu_cores=4), request("7B", quantization="8bit"))
    assert single.tp_size == 1 and single.cpu_threads_per_rank == 4


def test_several_nodes_multiply_replicas_not_ranks():
    one = plan_deployment(EIGHT_80, request("70B"))
    two = plan_deployment(Machine(nodes=2, gpus_per_node=8, gpu_memory_gib=80), request("70B"))
    assert two.tp_size == one.tp_size and two.replicas == 2 * one.replicas


def test_context_above_the_model_is_refused():
    with pytest.raises(ConfigError, match="context_length=8192"):
        plan_deployment(ONE_80, request("7B", context_length=8192))


@pytest.mark.parametrize("spec,want", [
    ("1x24", Machine(gpus_per_node=1, gpu_memory_gib=24)),
    ("8x80", Machine(gpus_per_node=8, gpu_memory_gib=80)),
    ("2x8x80GiB", Machine(nodes=2, gpus_per_node=8, gpu_memory_gib=80)),
    ("cpu", Machine(cpu_memory_gib=16, cpu_cores=1)),
    ("cpu:64:16", Machine(cpu_memory_gib=64, cpu_cores=16)),
])
def test_machine_specs(spec, want):
    assert Machine.parse(spec) == want


def test_bad_machine_specs_say_what_is_understood():
    with pytest.raises(ConfigError, match="1x24"):
        Machine.parse("lots of gpus")
    with pytest.raises(ConfigError, match="gpu_memory_gib"):
        Machine(gpus_per_node=2)


def test_table_shows_the_choices_and_the_fallbacks():
    plan = plan_deployment(ONE_24, request("13B"))
    table = render_plan(plan)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # a rectangle
    assert "| tp_size" in table and "llama-2-13b-chat" in table
    assert all(f in table for f in plan.fallbacks)


def test_plan_command_prints_the_table_or_the_explanation():
    import typer

    from deployments.cli.models import plan

    app = typer.Typer()
    app.command("plan")(plan)
    app.command("noop")(lambda: None)  # a second command keeps `plan` a subcommand
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "--model", "13B", "--machine", "1x80"])
    assert ok.exit_code == 0, ok.output
    assert "llama-2-13b-chat" in ok.output and "float16" in ok.output
    refused = runner.invoke(app, ["plan", "--model", "70B", "--machine", "4x24", "--dtype", "float16"])
    assert refused.exit_code == 2
    assert "8 GPUs of 24 GiB" in refused.output.replace("\n", " ")


def test_a_model_config_is_placed_as_its_plan_says():
    config = ModelConfig(model_size="13B", checkpoint="/models/llama-2-13b-chat-hf", context_length=4096,
                         temperature=0.2)
    plan = plan_for_config(config, ONE_24)
    placed = apply_plan(config, plan)
    assert (placed.device, placed.quantization, placed.tp_size) == ("cuda", "8bit", 1)
    assert placed.max_num_seqs == plan.max_num_seqs < config.max_num_seqs
    assert placed.temperature == 0.2 and placed.checkpoint == config.checkpoint  # the rest is kept
    on_cpu = apply_plan(ModelConfig(model_size="tiny", context_length=2048), plan_for_config(ModelConfig(), CPU_24))
    assert (on_cpu.device, on_cpu.dtype, on_cpu.tp_size) == ("cpu", "float32", 2)
