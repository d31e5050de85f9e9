"""Generated operator files: Prometheus rules (promtool), the committed copies, and the
dashboard push against Grafana's recorded request/response contract (a stub on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml
from typer.testing import CliRunner

from cluster.config import load_config
from cluster.observability.alerts import AlertThresholds, alert_rules, write_prometheus_configs
from cluster.observability.dashboards import build_dashboard
from deployments.cli.ops import ops_app
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
CONTRACT = json.loads((ROOT / "tests" / "fixtures" / "grafana_dashboard_push.json").read_text())


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs the Debian package prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_generated_rules_and_config_pass_promtool(tmp_path):
    tool = promtool()
    config, rules = write_prometheus_configs(tmp_path, AlertThresholds(ttft_objective_s=0.5))
    check = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    check = subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rules_cover_the_issue_s_alerts_with_the_objectives():
    names = {r["alert"]: r for g in alert_rules(AlertThresholds(ttft_objective_s=0.7))["groups"] for r in g["rules"]}
    assert set(names) == {
        "MAITimeToFirstTokenOverObjective", "MAIQueueTimeOverObjective", "MAIQueueGrowing",
        "MAIHighErrorRate", "MAIReplicaRestarting", "MAIKVCachePressure", "MAINodeMemoryPressure",
    }
    assert names["MAITimeToFirstTokenOverObjective"]["expr"].endswith("> 0.7")


def test_committed_configs_match_the_generators():
    """ray_configs/ is what `m-ai dashboards write` produces (regenerate after a change)."""
    committed = ROOT / "ray_configs"
    autoscaling = load_config(None).serving.autoscaling
    assert yaml.safe_load((committed / "prometheus" / "alerts.yml").read_text()) == alert_rules(
        AlertThresholds.from_autoscaling(autoscaling))
    assert json.loads((committed / "grafana" / "m-ai.json").read_text()) == build_dashboard()


class _GrafanaStub(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                              "body": json.loads(body)})
        answer = CONTRACT["response"]
        if self.headers.get("Authorization") != CONTRACT["request"]["headers"]["Authorization"]:
            answer = {"status": 401, "body": {"message": "invalid API key"}}
        data = json.dumps(answer["body"]).encode()
        self.send_response(answer["status"])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def grafana_stub():
    _GrafanaStub.requests = []
    server = HTTPServer(("127.0.0.1", 0), _GrafanaStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _GrafanaStub.requests
    server.shutdown()
    server.server_close()


def test_push_follows_grafana_s_contract(grafana_stub):
    url, seen = grafana_stub
    expected = CONTRACT["request"]
    result = CliRunner().invoke(ops_app, ["dashboards", "push", "--url", url, "--token", "glsa_test_token",
                                          "--folder-uid", "llm"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == CONTRACT["response"]["body"]
    assert len(seen) == 1
    request = seen[0]
    assert (request["method"], request["path"]) == (expected["method"], expected["path"])
    assert request["headers"]["Authorization"] == expected["headers"]["Authorization"]
    assert request["headers"]["Content-Type"].startswith(expected["headers"]["Content-Type"])
    body = request["body"]
    assert set(body) == set(expected["body_keys"]) and body["overwrite"] is True and body["folderUid"] == "llm"
    dashboard = body["dashboard"]
    assert dashboard["id"] is None and dashboard["uid"] == expected["dashboard_uid"]
    assert {p["type"] for p in dashboard["panels"]} == {"row", "timeseries"}


def test_push_reports_a_refusal(grafana_stub):
    url, _ = grafana_stub
    result = CliRunner().invoke(ops_app, ["dashboards", "push", "--url", url, "--token", "wrong"])
    assert result.exit_code == 1 and "refused" in result.output
