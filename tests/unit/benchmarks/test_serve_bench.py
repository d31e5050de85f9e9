"""The serving benchmark's own arithmetic: the synthetic chat workload (seeded, shaped as
documented), the percentiles, goodput objectives and the JSON figures of one rate."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys

import pytest

from tests.support.paths import REPO_ROOT

PATH = REPO_ROOT / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("serve_bench", None)


def test_the_workload_is_seeded_and_shaped_as_documented(bench):
    bodies = bench.chat_workload(400, 7, 40, 48)
    assert bodies == bench.chat_workload(400, 7, 40, 48)
    assert bodies != bench.chat_workload(400, 8, 40, 48)
    with_history = sum(len(b["messages"]) > 1 for b in bodies) / len(bodies)
    assert 0.22 < with_history < 0.38  # 30% carry a system prompt and an earlier exchange
    max_tokens = [b["max_tokens"] for b in bodies]
    assert 38 <= statistics.median(max_tokens) <= 58 and min(max_tokens) >= 8
    assert max(max_tokens) <= 4 * 48
    words = [len(b["messages"][-1]["content"].split()) - 4 for b in bodies]  # minus the lead-in
    assert 30 <= statistics.median(words) <= 52
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)


def test_summary_gives_mean_and_nearest_rank_percentiles_in_ms(bench):
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = bench.summary(values)
    assert s["p50"] == pytest.approx(50) and s["p90"] == pytest.approx(90)
    assert s["p99"] == pytest.approx(99) and s["mean"] == pytest.approx(50.5)
    assert bench.summary([])["p99"] is None


def test_goodput_counts_requests_meeting_every_objective(bench):
    objectives = bench.parse_goodput("ttft:100,tpot:20")
    assert objectives == {"ttft": 100.0, "tpot": 20.0}
    fast = bench.Result(ok=True, status=200, ttft_s=0.05, e2e_s=0.24, output_tokens=11)
    slow_start = bench.Result(ok=True, status=200, ttft_s=0.2, e2e_s=0.3, output_tokens=11)
    failed = bench.Result(ok=False, status=503, error="HTTP 503: busy")
    assert fast.tpot_s == pytest.approx(0.019)
    figures = bench.rate_figures(4.0, None, [fast, slow_start, failed], 2.0, objectives)
    assert figures["goodput_req_per_s"] == pytest.approx(0.5)
    assert figures["error_rate"] == pytest.approx(1 / 3) and figures["errors"] == {"HTTP 503": 1}
    assert figures["output_tokens_per_s"] == pytest.approx(11)
    assert set(figures["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert bench.rate_figures(math.inf, 8, [fast], 1.0, {})["request_rate"] == "inf"
    with pytest.raises(SystemExit):
        bench.parse_goodput("latency:5")


def test_default_goodput_objectives_are_three_times_one_request_alone(bench):
    assert bench.DEFAULT_GOODPUT == "auto:3" and bench.auto_factor("auto:3") == 3.0
    assert bench.auto_factor("ttft:100") is None
    with pytest.raises(SystemExit):
        bench.auto_factor("auto:0.5")
    alone = [bench.Result(ok=True, status=200, ttft_s=t, e2e_s=t + 0.2, output_tokens=11)
             for t in (0.04, 0.05, 0.06)]
    objectives, medians = bench.single_stream_objectives(alone, 3.0)
    assert medians["ttft"] == pytest.approx(50) and medians["tpot"] == pytest.approx(20)
    assert objectives == {"ttft": pytest.approx(150), "tpot": pytest.approx(60)}
    # a request as fast as one alone meets them; one three times slower to start does not
    loaded = [bench.Result(ok=True, status=200, ttft_s=0.05, e2e_s=0.25, output_tokens=11),
              bench.Result(ok=True, status=200, ttft_s=0.2, e2e_s=0.4, output_tokens=11)]
    assert bench.rate_figures(4.0, None, loaded, 1.0, objectives)["goodput_req_per_s"] == pytest.approx(1)
