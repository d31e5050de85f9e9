"""Bottleneck detection from per-request breakdowns and from Ray's metrics page."""

from __future__ import annotations

import pytest

from cluster.observability.diagnosis import (
    DOMINANT_SHARE,
    RECOMMENDATIONS,
    EngineFigures,
    StageStats,
    diagnose,
    merge,
    render,
    stats_from_exposition,
    summarize,
)
from cluster.observability.metric_specs import STAGES
from cluster.observability.output_quality import assess, repetition_ratio


def breakdowns(**stage_seconds: float) -> list[dict[str, float]]:
    return [{s: stage_seconds.get(s, 0.01) * (1 + i / 10) for s in STAGES} for i in range(10)]


@pytest.mark.parametrize("stage", STAGES)
def test_the_dominant_stage_is_named_with_its_recommendation(stage):
    result = diagnose(summarize(breakdowns(**{stage: 1.0})))
    assert result.dominant == stage and result.requests == 10
    assert result.share[stage] > DOMINANT_SHARE
    assert result.recommendation == RECOMMENDATIONS[stage]
    assert result.findings[0].startswith(stage)


def test_spread_time_is_balanced_and_no_data_says_so():
    even = diagnose(summarize(breakdowns(queue=1, prefill=1, decode=1, output_processing=1, memory_retrieval=1)))
    assert even.dominant == "balanced"
    empty = diagnose(summarize([]))
    assert empty.dominant is None and empty.requests == 0 and "No requests" in render(empty)


def test_engine_figures_sharpen_the_recommendation():
    queued = diagnose(summarize(breakdowns(queue=2.0)), EngineFigures(kv_cache_usage=1.0, requests_waiting=7))
    assert "KV cache is full" in queued.recommendation
    assert any("7 requests waiting" in f for f in queued.findings)
    prefill = diagnose(summarize(breakdowns(prefill=2.0)), EngineFigures(prefix_cache_hit_rate=0.05))
    assert "rarely hits" in prefill.recommendation


def test_stages_recorded_by_several_processes_are_divided_by_requests():
    # the replica records queue/prefill/decode once per request; the ingress adds output time
    stats = {"queue": StageStats(4, 0.4), "prefill": StageStats(4, 0.4), "decode": StageStats(4, 0.4),
             "output_processing": StageStats(8, 4.0), "memory_retrieval": StageStats(0, 0.0)}
    result = diagnose(stats)
    assert result.requests == 4 and result.mean_s["output_processing"] == pytest.approx(1.0)
    assert result.dominant == "output_processing"


PAGE = """# HELP ray_m_ai_request_stage_seconds Per-request timing breakdown
# TYPE ray_m_ai_request_stage_seconds histogram
ray_m_ai_request_stage_seconds_bucket{Component="core_worker",WorkerId="a",le="0.1",model="m",replica="r1",stage="decode"} 1.0
ray_m_ai_request_stage_seconds_sum{Component="core_worker",WorkerId="a",model="m",replica="r1",stage="decode"} 6.0
ray_m_ai_request_stage_seconds_count{Component="core_worker",WorkerId="a",model="m",replica="r1",stage="decode"} 3.0
ray_m_ai_request_stage_seconds_sum{WorkerId="b",model="m",replica="r2",stage="decode"} 2.0
ray_m_ai_request_stage_seconds_count{WorkerId="b",model="m",replica="r2",stage="decode"} 1.0
ray_m_ai_request_stage_seconds_sum{WorkerId="b",model="m",replica="r2",stage="queue"} 0.4
ray_m_ai_request_stage_seconds_count{WorkerId="b",model="m",replica="r2",stage="queue"} 4.0
ray_m_ai_request_stage_seconds_sum{WorkerId="c",model="other",replica="r3",stage="queue"} 100.0
ray_m_ai_request_stage_seconds_count{WorkerId="c",model="other",replica="r3",stage="queue"} 1.0
ray_other_metric{stage="decode"} 5.0
"""


def test_exposition_is_summed_over_processes_and_filtered_by_model():
    stats = stats_from_exposition(PAGE, model="m")
    assert stats["decode"] == StageStats(4.0, 8.0) and stats["queue"] == StageStats(4.0, 0.4)
    everything = stats_from_exposition(PAGE)
    assert everything["queue"] == StageStats(5.0, 100.4)
    assert merge(stats, stats)["decode"] == StageStats(8.0, 16.0)
    assert diagnose(stats).dominant == "decode"


def test_cumulative_counters_are_differenced_and_a_reset_restarts():
    assert StageStats(10, 5.0).minus(StageStats(4, 2.0)) == StageStats(6, 3.0)
    assert StageStats(2, 1.0).minus(StageStats(4, 2.0)) == StageStats(2, 1.0)


def test_output_quality_signals():
    assert repetition_ratio("a b c a b c a b c a b c") > 0.5
    assert repetition_ratio("the quick brown fox jumps over the lazy dog") == 0.0
    q = assess("  ", "length", {"type": "json_object"})
    assert q.truncated and q.empty and q.json_valid is False
    assert assess('{"a": 1}', "stop", {"type": "json_schema"}).json_valid is True
    assert assess("hello", "stop").json_valid is None
