"""A request's timing breakdown and metrics in the LLM replica (recorder captured, no Ray)."""

from __future__ import annotations

import time

import pytest

from cluster.autoscaling.latency_window import LatencyWindow
from cluster.errors import CapacityError
from deployments.llm_server.request_metrics import RequestTrace
from engine.types import RequestOutput


class Capture:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict]] = []

    def observe(self, name, value, **tags):
        self.calls.append(("observe", name, value, tags))

    def inc(self, name, value=1.0, **tags):
        self.calls.append(("inc", name, value, tags))

    def values(self, name, **tags):
        return [c[2] for c in self.calls if c[1] == name and all(c[3].get(k) == v for k, v in tags.items())]


def test_breakdown_covers_queue_prefill_decode_and_output():
    rec, window = Capture(), LatencyWindow(30)
    trace = RequestTrace(rec, window, "r1", time.time() - 0.2)  # 0.2 s in Serve's queue
    t0 = time.monotonic()
    time.sleep(0.05)  # waits in the replica before the engine takes it
    arrival = time.monotonic()
    time.sleep(0.05)  # prefill
    first = time.monotonic()
    trace.on_output(RequestOutput("r1", token_ids=[5], text="a", arrival_time=arrival, first_token_time=first))
    for _ in range(3):
        time.sleep(0.02)
        trace.on_output(RequestOutput("r1", token_ids=[6, 7], text="bc", arrival_time=arrival, first_token_time=first))
    time.sleep(0.01)  # the caller shapes the answer after the last delta
    final = RequestOutput("r1", finish_reason="length", prompt_tokens=12, completion_tokens=7)
    stages = trace.finish(final, "a bc bc bc", None)
    assert stages["queue"] == pytest.approx(0.2 + (arrival - t0), abs=0.03)
    assert stages["prefill"] == pytest.approx(first - arrival, abs=0.01)
    assert stages["decode"] == pytest.approx(0.06, abs=0.03)
    assert stages["output_processing"] >= 0.01
    assert rec.values("time_to_first_token_seconds")[0] == pytest.approx(0.2 + first - t0, abs=0.03)
    assert len(rec.values("inter_token_latency_seconds")) == 3
    assert rec.values("inter_token_latency_seconds")[0] == pytest.approx(0.01, abs=0.01)  # per token
    assert rec.values("prompt_tokens_total") == [12] and rec.values("generation_tokens_total") == [7]
    assert rec.values("request_success_total", finished_reason="length") == [1.0]
    assert rec.values("output_truncated_total") == [1.0]
    assert {c[3]["stage"] for c in rec.calls if c[1] == "request_stage_seconds"} == {
        "queue", "prefill", "decode", "output_processing"}
    report = window.report()
    assert report["ttft"] == pytest.approx(rec.values("time_to_first_token_seconds")[0])
    assert report["waiting"] == 0


def test_failures_and_cancellations_count_once_by_kind():
    rec, window = Capture(), LatencyWindow(30)
    trace = RequestTrace(rec, window, "r2")
    assert window.report()["waiting"] == 1
    trace.fail(CapacityError("full"))
    trace.cancelled()  # the finally block after a failure must not count it again
    assert rec.values("request_errors_total", kind="rate_limit_error", source="llm_server") == [1.0]
    other = RequestTrace(rec, window, "r3")
    other.cancelled()
    assert rec.values("request_errors_total", kind="cancelled") == [1.0]
    assert window.report()["waiting"] == 0
