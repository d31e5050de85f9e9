"""A real Prometheus (Debian package) on loopback scrapes Ray's metrics endpoint while HTTP
traffic runs: the M-AI metrics, a firing alert, every Grafana panel's PromQL, and
``m-ai diagnose --prometheus``, all through Prometheus' HTTP API."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import ray
import yaml
from typer.testing import CliRunner

from cluster.observability.alerts import AlertThresholds, alert_rules, scrape_config
from cluster.observability.dashboards import build_dashboard, queries
from deployments.cli.ops import ops_app
from tests.support.serve_harness import app_config, free_port, wait_until

MODEL = "m-ai-prom"  # a name of its own: metrics of other test apps do not mix in
# Panels whose metrics this traffic must produce (the others may legitimately be empty: no
# GPU, no memory actor, no JSON answers, no errors...).
MUST_HAVE_DATA = (
    "time to first token seconds", "e2e request latency seconds", "request stage seconds",
    "generation tokens total", "num requests running", "kv cache usage perc",
    "process resident memory bytes", "session store op seconds", "memory retrieval seconds",
)


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: .ci/run installs the Debian package prometheus")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def app(serve_cluster):
    deployed = serve_cluster.deploy(
        app_config([{"name": MODEL}], metrics_interval_s=1.0), prefix="prom"  # the real engine
    )
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    binary = prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    node = next(n for n in ray.nodes() if n["Alive"])
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    # the shipped rules, with an objective every request misses and no waiting, so one fires
    rules = alert_rules(AlertThresholds(ttft_objective_s=0.0001, for_s=1, rate_window="1m"))
    (workdir / "alerts.yml").write_text(yaml.safe_dump(rules))
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(scrape_config([target], interval_s=1)))
    port = free_port()
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, timeout_s=30,
                   what="Prometheus ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def traffic(app, prometheus):
    """Chat requests over HTTP (some with a session) until the module's tests are done."""
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(base_url=app.url, timeout=30) as client:
            session = client.post("/v1/sessions", json={}).json()["id"]
            i = 0
            while not stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 16}
                if i % 3 == 0:
                    body["session_id"] = session
                client.post("/v1/chat/completions", json=body)
                i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


def query(url: str, expr: str) -> dict:
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def query_range(url: str, expr: str, last_s: int = 120) -> dict:
    """What a Grafana panel asks: ``expr`` over the last ``last_s`` seconds, every 2 s."""
    end = time.time()
    answer = httpx.get(url + "/api/v1/query_range", params={"query": expr, "start": end - last_s, "end": end,
                                                           "step": 2}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def test_m_ai_metrics_reach_prometheus(prometheus, traffic):
    def scraped() -> float:
        rows = query(prometheus, f'sum(ray_m_ai_time_to_first_token_seconds_count{{model="{MODEL}"}})')["result"]
        return float(rows[0]["value"][1]) if rows else 0.0

    assert wait_until(scraped, timeout_s=90, interval_s=1, what="TTFT counts in Prometheus") > 0
    rows = query(prometheus, "sum by (stage) (ray_m_ai_request_stage_seconds_count)")["result"]
    assert {r["metric"]["stage"] for r in rows} >= {"queue", "prefill", "decode", "output_processing"}


def test_an_alert_fires(prometheus, traffic):
    def firing() -> list:
        return query(prometheus, 'ALERTS{alertname="MAITimeToFirstTokenOverObjective", alertstate="firing"}')["result"]

    rows = wait_until(firing, timeout_s=90, interval_s=1, what="a firing alert")
    assert rows[0]["metric"]["model"] == MODEL and rows[0]["metric"]["severity"] == "warning"


def test_every_dashboard_query_runs_and_the_core_panels_have_data(prometheus, traffic):
    def empty_panels() -> list[str]:
        return [title for title, expr in queries(build_dashboard()) if not query_range(prometheus, expr)["result"]]

    # This replica's gauges reach Prometheus after its next report and scrape, later on a busy
    # machine: wait for the core panels (bounded), then every query must still run.
    try:
        wait_until(lambda: not [t for t in MUST_HAVE_DATA if t in empty_panels()], timeout_s=90,
                   interval_s=2, what="data in the core panels")
    except AssertionError:
        pass  # the assertion below names the empty ones
    empty = [t for t in MUST_HAVE_DATA if t in empty_panels()]
    assert not empty, (empty, ray_endpoint_lines(empty))


def ray_endpoint_lines(titles: list[str]) -> list[str]:
    """What Ray's metrics endpoint shows now for the panels ``titles`` (for a failure's message)."""
    node = next(n for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
    names = ["ray_m_ai_" + title.replace(" ", "_") for title in titles]
    return [line for line in text.splitlines() if line.startswith(tuple(names))][:20]


def test_diagnose_reads_prometheus(prometheus, traffic):
    import json

    def diagnose() -> dict:
        result = CliRunner().invoke(ops_app, ["diagnose", "--prometheus", prometheus, "--model", MODEL, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    # the request histograms need two scrapes before a rate over them has a value
    try:
        wait_until(lambda: diagnose()["requests"] > 0, timeout_s=60, interval_s=2, what="requests in the diagnosis")
    except AssertionError:
        pass  # the assertion below shows the report
    report = diagnose()
    assert report["requests"] > 0 and report["dominant"] is not None, report
