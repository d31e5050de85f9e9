"""The metric registry, the dashboard built from it, and recording outside Ray."""

from __future__ import annotations

import re

from cluster.observability import metric_specs as metrics
from cluster.observability.dashboards import (
    build_dashboard,
    covered_metrics,
    panel_targets,
    queries,
)

PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_names_are_unique_prefixed_and_valid():
    names = [m.full_name for m in metrics.ALL]
    assert len(names) == len(set(names))
    for m in metrics.ALL:
        assert m.full_name.startswith("m_ai_") and PROM_NAME.match(m.prometheus_name)
        assert m.prometheus_name == "ray_" + m.full_name
        assert all(PROM_NAME.match(label) for label in m.labels)
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets) and m.buckets[0] > 0
        if m.kind == "counter":
            assert m.name.endswith("_total")


def test_vllm_names_are_kept():
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting",
                 "prompt_tokens_total", "generation_tokens_total", "kv_cache_usage_perc"):
        assert metrics.spec(name).full_name == f"m_ai_{name}"


def test_every_metric_has_a_dashboard_panel_per_model_and_replica():
    model = build_dashboard()
    assert covered_metrics(model) == set(metrics.BY_NAME)
    variables = {v["name"] for v in model["templating"]["list"]}
    assert {"datasource", "model", "replica"} <= variables
    for spec in metrics.ALL:
        for expr, _ in panel_targets(spec):
            for label in ("model", "replica"):
                if label in spec.labels:
                    assert f'{label}=~"${label}"' in expr, (spec.name, expr)
    # variables are replaced for queries run outside Grafana
    assert all("$" not in expr for _, expr in queries(model))


def test_panels_do_not_overlap():
    cells = set()
    for panel in build_dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


OUTSIDE_RAY = """
import ray
from cluster.observability import metric_specs as metrics
from deployments.llm_server import metrics as recording
from deployments.llm_server.metrics import MetricsRecorder

rec = MetricsRecorder(model="m", replica="r")
rec.observe("time_to_first_token_seconds", 0.1)
rec.inc("request_errors_total", kind="x", unknown_label="ignored")
rec.set("num_requests_running", 3)
assert not ray.is_initialized()
for name in ("time_to_first_token_seconds", "request_errors_total", "num_requests_running"):
    assert type(recording.metric(name)[1]).__name__ == "_Disabled", name
tags = rec._tags(metrics.spec("request_errors_total"), {"kind": "x", "unknown_label": "ignored"})
assert tags == {label: {"model": "m", "replica": "r", "kind": "x"}.get(label, "")
                for label in metrics.spec("request_errors_total").labels}
assert "unknown_label" not in tags
try:
    rec.set("num_requests_runing", 3)
except KeyError as exc:
    assert "num_requests_running" in str(exc)  # the message lists the known names
else:
    raise AssertionError("a misspelled metric name was accepted")
"""


def test_recording_outside_ray_is_a_no_op():
    """The engine used as a library records nothing and starts no Ray; a misspelled metric
    still fails loudly (it would otherwise vanish from the dashboard unnoticed). In a fresh
    interpreter: the test session itself may have started Ray for other tests."""
    import subprocess
    import sys

    from tests.support.paths import REPO_ROOT

    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE_RAY], cwd=REPO_ROOT, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
