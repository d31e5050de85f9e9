"""One local Ray + Serve per pytest session, shared by the integration and e2e tests.

Ray starts once (``address="local"``, a temp dir of its own, no dashboard, 8 logical CPUs on
whatever cores the machine has) the first time a test asks for ``serve_cluster``, and stops at
the end of the session (``ray.shutdown()`` stops the processes it started). Each test module
deploys its own applications under unique names and route prefixes, so they never collide.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import AppConfig, build_app_config
from cluster.config.serving import SERVE_CLUSTER_ENV
from cluster.net import free_port
from deployments.app import FAKE_ENGINE as FAKE_ENGINE  # tests that need the fake name it

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_CPUS = 8

# Small resource shares so that several apps fit in NUM_CPUS; quick shutdown and health checks.
FAST_SERVING: dict[str, Any] = {
    "ingress_num_cpus": 0.1,
    "replica_num_cpus": 0.1,
    "rank_num_cpus": 0.25,
    "health_check_period_s": 1.0,
    "health_check_timeout_s": 10.0,
    "graceful_shutdown_timeout_s": 1.0,
    "graceful_shutdown_wait_loop_s": 0.1,
}
FAST_FAKE = {"tokens_per_s": 2000.0, "tokenizer": "bytes"}

# Tests' memory: the hashing embedder (no MiniLM load), files in the app's own directory.
FAST_MEMORY: dict[str, Any] = {"embedder": "hashing"}


_STATE_ROOT: str | None = None


def _state_root() -> str:
    """One temp folder per test process for the apps' session and memory files, removed
    when the process exits."""
    global _STATE_ROOT
    if _STATE_ROOT is None:
        _STATE_ROOT = tempfile.mkdtemp(prefix="m-ai-test-state-")
        atexit.register(shutil.rmtree, _STATE_ROOT, ignore_errors=True)
    return _STATE_ROOT


def app_config(
    models: list[dict] | None = None, memory: dict[str, Any] | None = None, **serving: Any
) -> AppConfig:
    """An ``AppConfig`` with ``FAST_SERVING`` (overridden by ``serving``), ``models`` and
    ``FAST_MEMORY`` (overridden by ``memory``)."""
    # Each app gets its own durable session store: two apps must never share a shard's log.
    state = {"session_state_uri": tempfile.mkdtemp(prefix="sessions-", dir=_state_root())}
    memory_root = {"storage_uri": tempfile.mkdtemp(prefix="memory-", dir=_state_root())}
    data: dict[str, Any] = {
        "serving": {**FAST_SERVING, **state, **serving},
        "memory": {**FAST_MEMORY, **memory_root, **(memory or {})},
    }
    if models is not None:
        data["models"] = models
    return build_app_config(data, "test config")


@dataclass
class DeployedApp:
    name: str
    url: str  # http://127.0.0.1:PORT/NAME ; the OpenAI base URL is url + "/v1"

    @property
    def handle(self) -> Any:
        from ray import serve

        return serve.get_app_handle(self.name)

    def llm(self, model: str = "m-ai-tiny") -> Any:
        """The handle of a model's LLMServer deployment."""
        from ray import serve

        from cluster.config import ModelConfig
        from deployments.app import deployment_name

        return serve.get_deployment_handle(deployment_name(ModelConfig(name=model)), self.name)

    def rank0(self, model: str = "m-ai-tiny") -> Any:
        """The rank-0 actor of the model's (first) replica. Its calls do not wait in
        Serve's request queue, unlike calls to the LLMServer deployment."""
        import ray

        info = self.llm(model).describe.remote().result()
        return ray.get_actor(info["rank_names"][0], namespace=info["namespace"])

    def delete(self) -> None:
        from ray import serve

        serve.delete(self.name)


@dataclass
class ServeCluster:
    http_port: int
    temp_dir: str

    def deploy(
        self,
        config: AppConfig,
        *,
        prefix: str = "app",
        engine_cls: str | type | None = None,
        engine_options: dict[str, Any] | None = None,
        live: dict[str, dict[str, Any]] | None = None,
        name: str | None = None,
    ) -> DeployedApp:
        """Deploy ``build_app(config)`` under a unique name (or ``name``, to update it).

        ``engine_cls`` None is the real engine (the tiny checkpoint unless ``config`` names
        another); a test passes ``FAKE_ENGINE`` only for what the fake alone gives (no model
        load, for serving-graph tests) and says why where it does. What a prompt held is read
        from the session's context preview (``POST /v1/sessions/{id}/context``), not from a
        fake's echo."""
        from ray import serve

        from deployments.app import build_app

        name = name or f"{prefix}-{uuid.uuid4().hex[:6]}"
        app = build_app(config, engine_cls=engine_cls, engine_options=engine_options, live=live)
        serve.run(app, name=name, route_prefix=f"/{name}")
        return DeployedApp(name, f"http://127.0.0.1:{self.http_port}/{name}")

    def deploy_config(
        self, name: str, args: dict[str, Any], deployments: list[dict[str, Any]] | None = None
    ) -> DeployedApp:
        """Deploy the way ``serve deploy`` does: the controller imports
        ``deployments.app:app_builder`` with ``args``; ``deployments`` holds per-deployment
        overrides (e.g. ``user_config``). Deploying again with only a new ``user_config``
        reconfigures the running replicas in place."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        app = {
            "name": name,
            "route_prefix": f"/{name}",
            "import_path": "deployments.app:app_builder",
            "args": args,
            "deployments": deployments or [],
        }
        client = _get_global_client()
        client.deploy_apps(ServeDeploySchema(applications=[app]))
        client._wait_for_application_running(name, timeout_s=120)
        return DeployedApp(name, f"http://127.0.0.1:{self.http_port}/{name}")


_cluster: ServeCluster | None = None
_users = 0


def acquire() -> ServeCluster:
    """Start Ray and Serve on first use; later callers share them."""
    global _cluster, _users
    if _cluster is None:
        import ray
        from ray import serve

        # Ray then uses 127.0.0.1 as the node address; workers import the repo's packages.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Serve's cluster-wide settings, as `m-ai serve` sets them (the proxy streams to the
        # ingress over gRPC): the tests run the transport users run.
        for key, value in SERVE_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO_ROOT) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
        temp_dir = tempfile.mkdtemp(prefix="m-ai-ray-")
        started = time.monotonic()
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=NUM_CPUS,
            _temp_dir=temp_dir,
            log_to_driver=False,
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _cluster = ServeCluster(port, temp_dir)
        print(f"\nlocal Ray + Serve up in {time.monotonic() - started:.1f}s (temp dir {temp_dir})")
    _users += 1
    return _cluster


def release() -> None:
    """The last user stops Serve and Ray and removes the temp dir."""
    global _cluster, _users
    _users -= 1
    if _users > 0 or _cluster is None:
        return
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(_cluster.temp_dir, ignore_errors=True)
        _cluster = None


def wait_until(
    predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s}s (last error: {last_error!r})")
