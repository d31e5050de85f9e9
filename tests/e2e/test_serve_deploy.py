"""``serve deploy ray_configs/serve_tiny_cpu.yaml`` on a cluster started with ``ray start --head``,
the way docs/deployment.md tells an operator to do it: the application comes up, answers the
OpenAI API over HTTP, ``serve status`` reports it, ``serve shutdown`` removes it.

The cluster is this test's own, apart from the local Ray the other tests share
(tests/support/serve_harness.py): its own temp dir, its own ports (free ones, and a window
of worker ports outside the default 10002-19999), its own auth token (``RAY_AUTH_TOKEN``, not
``~/.ray/auth_token``) and its own processes: ``ray start --block`` runs as a child of this
test and is stopped by its PID, then any process still running from the cluster's temp dir is
stopped by its PID.

The YAML is deployed as written except for the HTTP port (a free one), the checkpoint (the
test cache's tiny checkpoint instead of ``~/.cache``) and the session store (the cluster's temp
dir instead of ``~/.local/share``). The model runs on the real engine, two tensor-parallel CPU
ranks as the file says (about 35 s in all on an idle 2-core machine, 6 s more than with the
fake engine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.support.serve_harness import REPO_ROOT, free_port, wait_until

CPU_CONFIG = REPO_ROOT / "ray_configs" / "serve_tiny_cpu.yaml"
BIN = Path(sys.executable).parent
MODEL = "m-ai-tiny"


@dataclass
class HeadNode:
    process: subprocess.Popen
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:PORT, the address the serve CLI talks to
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``serve`` command line against this cluster (output captured; check=True)."""
        return subprocess.run(
            [str(BIN / "serve"), *args, "--address", self.dashboard],
            env=self.env,
            cwd=self.temp_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )


def cluster_env(token: str) -> dict[str, str]:
    """This process's environment without any Ray address or auth it may carry (the session's
    Ray), plus this cluster's token and node address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node address 127.0.0.1
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(REPO_ROOT),
        RAY_SERVE_PROXY_USE_GRPC="1",  # as docs/deployment.md starts the head
        RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH="2147483647",
    )
    return env


def stop_cluster(head: HeadNode) -> None:
    """SIGTERM to ``ray start --block`` (it stops the processes it started), then SIGKILL to
    any process left that runs from this cluster's temp dir: all ours, each by its PID."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=10)
    marker = str(head.temp_dir)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture
def head_node() -> Iterator[HeadNode]:
    temp_dir = Path(tempfile.mkdtemp(prefix="m-ai-e2e-ray-"))
    token = secrets.token_hex(16)
    env = cluster_env(token)
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    # Its own window of worker ports, away from the default 10002-19999 that the session's Ray
    # draws from (free_port() picks from the ephemeral range, 32768 and up, on Linux).
    low = 20000 + 200 * secrets.randbelow(50)
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=8",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 199}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = HeadNode(process, temp_dir, f"http://127.0.0.1:{dashboard_port}", env)
    try:

        def dashboard_up() -> bool:
            assert process.poll() is None, (temp_dir / "ray-start.log").read_text()[-3000:]
            reply = httpx.get(
                f"{head.dashboard}/api/version",
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            )
            return reply.status_code == 200

        wait_until(dashboard_up, timeout_s=120, interval_s=0.5, what="the Ray dashboard")
        yield head
    finally:
        stop_cluster(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy_file(directory: Path, http_port: int, checkpoint: Path) -> Path:
    """The CPU config with the HTTP port, the checkpoint and the session store changed."""
    config = yaml.safe_load(CPU_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    (app,) = config["applications"]
    (model,) = app["args"]["config"]["models"]
    model["checkpoint"] = str(checkpoint)
    app["args"]["config"]["serving"]["session_state_uri"] = str(directory / "sessions")
    path = directory / "serve_tiny_cpu.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
# Processes (as ss names them: 15 characters) whose ports Ray Serve or torch bind everywhere.
EXPOSED_BY_DESIGN = ("ray::ServeRepli", "ray::RankActor")


def listening_sockets(head: HeadNode) -> list[tuple[str, str]]:
    """``(local address, process name)`` of the TCP sockets the cluster's processes listen
    on, from ``ss -ltnp`` (``ray start --block`` and everything it started)."""
    pids = {head.process.pid} | {
        p.pid for p in psutil.Process(head.process.pid).children(recursive=True)
    }
    if shutil.which("ss") is None:  # no iproute2: the same table from psutil
        return [
            (f"[{c.laddr.ip}]:{c.laddr.port}" if ":" in c.laddr.ip else f"{c.laddr.ip}:{c.laddr.port}",
             psutil.Process(c.pid).name())
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
    table = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in table.splitlines():
        fields = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((fields[3], name))
    return found


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_serve_deploy_of_the_cpu_config_serves_then_shuts_down(head_node, tiny_checkpoint):
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    config_file = deploy_file(head_node.temp_dir, http_port, tiny_checkpoint)

    deployed = head_node.cli("deploy", str(config_file))
    assert "Sent deploy request" in deployed.stdout + deployed.stderr

    def healthy() -> bool:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200

    wait_until(healthy, timeout_s=240, interval_s=1.0, what="GET /health = 200 after serve deploy")
    status = yaml.safe_load(head_node.cli("status").stdout)
    app = status["applications"]["m-ai"]
    assert app["status"] == "RUNNING"
    assert app["deployments"]["llm-m-ai-tiny"]["status"] == "HEALTHY"

    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]][0] == MODEL
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(reply)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("length", "stop")

    # docs/deployment.md: a one-machine cluster started this way listens on loopback only, but
    # for each Serve replica's internal gRPC port (Ray Serve binds it on all interfaces) and the
    # rendezvous port of torch.distributed in the rank-0 actor (c10d's TCPStore).
    sockets = listening_sockets(head_node)
    exposed = [s for s in sockets if not s[0].startswith(LOOPBACK)]
    assert exposed and all(name.startswith(EXPOSED_BY_DESIGN) for _, name in exposed), exposed
    assert any(name == "gcs_server" and addr.startswith(LOOPBACK) for addr, name in sockets)

    head_node.cli("shutdown", "-y")

    def gone() -> bool:
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            return True  # the proxy stopped with Serve
        return False

    wait_until(
        gone, timeout_s=60, interval_s=0.5, what="the HTTP proxy to stop after serve shutdown"
    )
