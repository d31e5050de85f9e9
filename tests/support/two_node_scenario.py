"""A Ray cluster of several nodes on one machine, a node removed under traffic.

Run by ``test_two_nodes.py`` in a process of its own (``python -m
tests.integration.two_node_scenario OUT.json``), with its own Ray temp dir (``RAY_TMPDIR``, so
even Ray's "current cluster" address file stays private): it never touches the Ray of the
shared test harness. ``ray.cluster_utils.Cluster`` starts a head node (1 CPU: the Serve
controller, the HTTP proxy; the ingress takes no CPU) and three worker nodes of 2 CPUs each; one LLM
replica (replica 1 CPU + one shard 1 CPU) fills a worker node, so the two replicas land on
two different nodes. While a client sends requests without pause, the worker node of one
replica is removed (its processes killed): Serve places that replica again on the free node.

It writes what it saw as JSON: the replicas' nodes before and after, the node removed, and
each request's send time and HTTP status (0: no answer within the client timeout).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_nodes(app_name: str, deployment: str) -> dict[str, str]:
    """Live Serve replica actors of ``deployment``: actor name -> node id (from the GCS)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return {
        info["Name"]: info["Address"]["NodeID"]
        for info in ray._private.state.actors().values()
        if info.get("Name", "").startswith(prefix) and info.get("State") == "ALIVE"
    }


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def cluster_state(app_name: str, deployment: str) -> str:
    """What a failed wait needs to be understood: replicas, their nodes, free CPUs per node."""
    import ray

    free = {
        n["NodeID"][:8]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]
    }
    available = ray.available_resources().get("CPU", 0)
    return (
        f"replicas={replica_nodes(app_name, deployment)} "
        f"ingress={replica_nodes(app_name, 'ingress')} node_cpus_total={free} free_cpus={available} "
        f"running={running_replicas(app_name, deployment)}"
    )


def wait_for(predicate, what: str) -> Any:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {PHASE_TIMEOUT_S:.0f}s")


class Traffic:
    """A client thread sending one small chat request after another; records (t, status)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.records: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT_S + 5)
        return self.records

    def _run(self) -> None:
        import httpx

        body = {"model": "m-ai-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.post("/v1/chat/completions", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                self.records.append((sent, status))
                time.sleep(0.05)


def run(out: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="m-ai-2n-")
    ray_dir = os.path.join(temp_dir, "ray")  # Ray's default dir under RAY_TMPDIR
    os.makedirs(ray_dir)
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    sys.path.insert(0, str(REPO_ROOT))

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app
    from tests.support.serve_harness import FAKE_ENGINE, app_config

    report: dict[str, Any] = {}
    traffic = None
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "temp_dir": ray_dir, "include_dashboard": False},
        )
        workers = [cluster.add_node(num_cpus=2) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = app_config(
            min_replicas=2,
            max_replicas=2,
            # The ingress takes no CPU: wherever Ray puts it, the third worker keeps the two
            # free CPUs the replaced replica's placement group needs.
            ingress_num_cpus=0.0,
            replica_num_cpus=1.0,
            rank_num_cpus=1.0,
            health_check_period_s=1.0,
        )
        app = build_app(config, engine_cls=FAKE_ENGINE, engine_options={"tokenizer": "bytes"})
        serve.run(app, name="twonode", route_prefix="/twonode")
        deployment = "llm-m-ai-tiny"
        before = replica_nodes("twonode", deployment)
        ingress_nodes = set(replica_nodes("twonode", "ingress").values())
        report["head_node"] = cluster.head_node.node_id
        report["worker_nodes"] = [w.node_id for w in workers]
        report["replica_nodes_before"] = before
        report["ingress_nodes"] = sorted(ingress_nodes)

        traffic = Traffic(f"http://127.0.0.1:{port}/twonode").start()
        time.sleep(3.0)
        victim_id = next(n for n in before.values() if n not in ingress_nodes)
        victim = next(w for w in workers if w.node_id == victim_id)
        report["removed_node"] = victim_id
        report["removed_at"] = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)

        def replaced() -> dict[str, str] | None:
            nodes = replica_nodes("twonode", deployment)
            if len(nodes) == 2 and victim_id not in nodes.values() and nodes != before:
                if running_replicas("twonode", deployment) == 2:
                    return nodes
            return None

        try:
            report["replica_nodes_after"] = wait_for(replaced, "replica placed again")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; {cluster_state('twonode', deployment)}") from None
        report["replaced_at"] = time.monotonic()
        time.sleep(3.0)
    finally:
        if traffic is not None:
            report["requests"] = traffic.stop()
        out.write_text(json.dumps(report, indent=2))
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
