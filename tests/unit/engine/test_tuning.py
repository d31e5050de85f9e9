"""m-ai tune and m-ai profile on the tiny model (engine only, no Ray)."""

from __future__ import annotations

import json

from cluster.config import ModelConfig
from engine.profiling import profile_engine
from engine.tuning import SettingResult, Workload, best, plot, sweep


def test_sweep_measures_each_setting_and_batching_helps(tiny_checkpoint, tmp_path):
    results = sweep(ModelConfig(model_size="tiny", checkpoint=str(tiny_checkpoint)), [1, 8], [256],
                    Workload(requests=8, prompt_tokens=(8, 24), max_tokens=16))
    assert [(r.max_num_seqs, r.max_batched_tokens) for r in results] == [(1, 256), (8, 256)]
    one, eight = results
    assert all(r.tokens_per_s > 0 and r.ttft_p50_s <= r.ttft_p90_s <= r.e2e_p90_s for r in results)
    # one slot: the burst queues behind each request's decode; eight slots take it at once
    assert eight.ttft_p90_s < one.ttft_p90_s / 2
    png = plot(results, tmp_path / "tune.png", 0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_prefers_throughput_within_the_objective():
    rs = [SettingResult(4, 128, 0.1, 0.2, 0.5, 100.0), SettingResult(16, 512, 0.2, 0.4, 0.9, 300.0),
          SettingResult(32, 2048, 0.5, 1.5, 2.0, 500.0)]
    assert best(rs, 0.5) == (rs[1], True)
    assert best(rs, 0.1) == (rs[0], False)  # none meets it: the lowest TTFT


def test_profile_records_engine_steps(tiny_checkpoint, tmp_path):
    config = ModelConfig(model_size="tiny", checkpoint=str(tiny_checkpoint), max_num_seqs=4)
    path, table = profile_engine(config, 4, tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    # the model's matmuls, from the engine thread (oneDNN's prepacked linear on a CPU that has it)
    assert names & {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"}
    assert "Self CPU" in table


def test_tune_and_profile_commands(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from deployments.cli.ops import ops_app

    config = tmp_path / "m.yaml"
    config.write_text(f"models:\n  - model_size: tiny\n    checkpoint: {tiny_checkpoint}\n")
    runner = CliRunner()
    tuned = runner.invoke(ops_app, ["tune", "-c", str(config), "--seqs", "4", "--tokens", "64",
                                    "--requests", "4", "--max-tokens", "4", "--ttft-objective", "30",
                                    "--plot", str(tmp_path / "t.png"), "--json"])
    assert tuned.exit_code == 0, tuned.output
    # the JSON line sits among the loader's progress bar and log lines (stderr is mixed in)
    report, _ = json.JSONDecoder().raw_decode(tuned.output[tuned.output.index('{"results"'):])
    assert len(report["results"]) == 1 and report["meets_objective"] is True
    assert (tmp_path / "t.png").exists()
    bad = runner.invoke(ops_app, ["tune", "-c", str(config), "--seqs", "four"])
    assert bad.exit_code == 1 and "positive integers" in bad.output
    profiled = runner.invoke(ops_app, ["profile", "-c", str(config), "--steps", "2", "--out", str(tmp_path / "p.json")])
    assert profiled.exit_code == 0, profiled.output
    assert (tmp_path / "p.json").stat().st_size > 0
