"""The typed configuration of serving: the HTTP endpoint, API keys, replicas and streaming.

``ServingConfig`` is the ``serving`` section of ``AppConfig``. It is pure data (no Ray): the
deployment options that ``deployments/app.py`` hands to Ray Serve are derived from it and the
model's ``ModelConfig`` by the functions at the bottom, so that they can be tested alone.

API keys are never stored in clear: the file maps the sha256 hex digest of each key to the
tenant that key belongs to (``m-ai config hash-key`` prints the digest of a key).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.autoscaling.policy import LatencyAutoscalingConfig, serve_autoscaling_config
from cluster.config.migration import MigrationConfig
from cluster.response_cache import ResponseCacheConfig

if TYPE_CHECKING:
    from cluster.config.model import ModelConfig

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which ``key`` is configured in ``serving.api_keys``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ServingConfig(BaseModel):
    """How the cluster is exposed and sized: one per application."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 exposes it.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="sha256 hex digest of an API key -> tenant name. Empty: authentication is off "
        "(logged as a warning) and every request belongs to tenant `default`.",
    )
    # -- the LLM deployments (one per model) --------------------------------------------------
    min_replicas: int = Field(1, ge=0, description="Replicas of each model kept running.")
    max_replicas: int = Field(
        1, ge=1, description="Replicas of each model at most (autoscaling above min)."
    )
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    autoscaling: LatencyAutoscalingConfig = Field(
        default_factory=LatencyAutoscalingConfig,
        description="How replicas scale between min_replicas and max_replicas: on latency "
        "objectives (default) or Serve's in-flight request count (docs/autoscaling.md).",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Serve sends one replica at once. None: twice the model's max_num_seqs, "
        "so that the engine always has the next requests waiting at each step boundary.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        description="Requests waiting for a replica before new ones get 429 with Retry-After. "
        "None: the model's max_queued_requests; -1: unbounded.",
    )
    session_affinity: bool = Field(
        True,
        description="Send a session's turns to the model replica whose prefix cache holds its "
        "earlier turns (a consistent hash on the session id; the less loaded of two other "
        "replicas when that one is full or gone). False: Serve's power of two choices for all.",
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Retry-After sent with 429 and 503 answers."
    )
    replica_num_cpus: float = Field(
        1.0, ge=0, description="CPUs of the replica process itself (bundle 0)."
    )
    rank_num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs per tensor-parallel rank (one bundle each). None: the model's "
        "cpu_threads_per_rank on CPU, 1 with a GPU.",
    )
    rank_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per rank; None: 1 when the model's device is `cuda`, else 0."
    )
    rank_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="Scheduling niceness of the rank processes. Ray starts every worker at 15 "
        "(RAY_worker_niceness) so that its raylet and GCS come first; a rank runs the engine's "
        "step loop, which every token of every stream waits for, so it runs at 0, ahead of "
        "Serve's proxy and replicas (15), which take the CPU time the engine leaves "
        "(docs/performance.md). 15: Ray's default, the ranks share the CPU equally with the "
        "serving processes.",
    )
    rank_start_timeout_s: float = Field(
        900.0, gt=0, description="Time the ranks of a replica get to load their weights."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health check interval.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Serve health check timeout.")
    graceful_shutdown_timeout_s: float = Field(
        20.0,
        ge=0,
        description="Time a stopping replica gets to finish its requests before it is killed.",
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="How often a stopping replica checks whether its requests are done."
    )
    rank_channel: Literal["socket", "ray"] = Field(
        "socket",
        description="How a model replica sends requests to its rank 0 and reads their outputs: "
        "'socket', a Unix socket between the two processes (they share a node), or 'ray', a Ray "
        "streaming call per request, which costs both processes about a millisecond of Ray's "
        "own work per request and per streamed output (docs/performance.md). Ray starts and "
        "supervises the ranks either way.",
    )
    # -- the ingress --------------------------------------------------------------------------
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP and handle API) replicas.")
    direct_ingress: bool = Field(
        False,
        description="`m-ai serve`: the ingress replica serves HTTP on host:port itself (Serve's "
        "direct ingress, RAY_SERVE_ENABLE_DIRECT_INGRESS) instead of Serve's HTTP proxy relaying "
        "each request and event to it: about 8 ms less to the first token and a quarter less "
        "serving CPU per token (docs/performance.md). One ingress replica per node, as one "
        "process owns the port; the proxy still runs on a free port of its own. A cluster "
        "started with `ray start` gets it from the environment there (docs/deployment.md).",
    )
    ingress_num_cpus: float = Field(0.5, ge=0, description="CPUs per ingress replica.")
    ingress_max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one ingress replica holds at once (it only awaits I/O)."
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest HTTP request body; a larger one gets 413 before it is parsed. "
        "1 MiB holds far more text than any Llama 2 context.",
    )
    response_cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig,
        description="Cache of whole responses to deterministic requests (temperature 0 or a seed), "
        "per ingress replica and tenant; off unless max_entries > 0.",
    )
    migration: MigrationConfig = Field(
        default_factory=MigrationConfig,
        description="Mid-stream migration: a stream whose model replica dies is resumed on another "
        "replica with the tokens already sent (cluster/config/migration.py).",
    )
    metrics_interval_s: float = Field(
        5.0, gt=0, description="How often each replica samples engine state and resource usage."
    )
    replica_event_loop: Literal["main", "separate"] = Field(
        "main",
        description="Where the ingress and LLM replicas run their request code. `main`: on the "
        "replica's own event loop, with their handles' routers in it too (Serve's "
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, "
        "set in these replicas' runtime_env): no thread hand-off per request and per streamed "
        "chunk (docs/performance.md). Our request code never blocks its loop (blocking work goes "
        "to threads). `separate`: Serve's default, one more thread per replica.",
    )
    # -- sessions -----------------------------------------------------------------------------
    session_state_uri: str = Field(
        "~/.local/share/m-ai/sessions",
        description="Where the session store keeps its write-ahead log and snapshots: a local "
        "directory or an s3:// / gs:// URI (see docs/sessions.md for each store's durability).",
    )
    session_store_shards: int = Field(
        1, ge=1, le=256, description="Session store actors (hash of session id)."
    )
    max_sessions_per_shard: int = Field(
        100_000, ge=1, description="Sessions one shard keeps; the least recently used go first."
    )
    # -- streaming ----------------------------------------------------------------------------
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="Shortest time between two events of one stream: tokens that come faster are "
        "coalesced into one event; a token that comes later goes out at once. 0: only the budget "
        "below spaces events.",
    )
    stream_max_events_per_s: float = Field(
        100.0,
        gt=0,
        description="Events per second one replica aims to send over all its streams: with many "
        "concurrent streams each stream's interval grows to streams / this (each event costs Ray's "
        "processes CPU, about 2-3 ms over the five processes it crosses on a small CPU machine; "
        "tokens per event rise instead). 100: 32 streams get an event every 0.32 s each.",
    )

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for digest, tenant in value.items():
            digest_norm = digest.strip().lower()
            if not _SHA256_RE.match(digest_norm):
                raise ValueError(
                    f"api_keys: {digest[:12]!r}... is not a sha256 hex digest (64 hex characters); "
                    f"store hashes, not keys: `m-ai config hash-key KEY` prints the digest"
                )
            if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
                raise ValueError(
                    f"api_keys: tenant {tenant!r} is not a valid tenant name; use 1-64 letters, digits and . _ -"
                )
            checked[digest_norm] = tenant
        return checked

    @field_validator("max_queued_requests")
    @classmethod
    def _check_queue(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError(
                "max_queued_requests=0 is not allowed; use -1 (unbounded) or a positive number"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ServingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}; "
                f"raise max_replicas or lower min_replicas"
            )
        if self.direct_ingress and self.ingress_replicas != 1:
            raise ValueError(
                f"ingress_replicas={self.ingress_replicas} with direct_ingress=true: the ingress "
                f"replica itself listens on port {self.port}, and only one process can; set "
                f"ingress_replicas: 1, or direct_ingress: false to serve through Serve's proxy"
            )
        if self.direct_ingress and self.port == 65535:
            raise ValueError(
                "port=65535 with direct_ingress=true: Serve hands out direct-ingress ports from "
                "[port, port + 1), which must stay below 65536; choose a lower port"
            )
        return self

    # -- derived values ---------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant of API key ``key``, or None when it is not configured."""
        return self.api_keys.get(hash_api_key(key))


class LiveConfig(BaseModel):
    """The ``user_config`` of an LLM deployment: what changes on running replicas (``reconfigure``).

    ``model`` holds changes to the model's config; only the live fields (sampling defaults,
    ``cluster.config.LIVE_FIELDS``) are taken, a change that needs a reload is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: dict[str, Any] = Field(
        default_factory=dict,
        description="ModelConfig fields to change live, e.g. {temperature: 0.2}.",
    )
    stream_interval_ms: float | None = Field(
        None, ge=0, description="Overrides serving.stream_interval_ms."
    )
    stream_max_events_per_s: float | None = Field(
        None, gt=0, description="Overrides serving.stream_max_events_per_s."
    )


def replica_bundles(serving: ServingConfig, model: ModelConfig) -> list[dict[str, float]]:
    """Placement group bundles of one LLM replica: the replica itself, then one per TP rank."""
    gpus = serving.rank_num_gpus
    if gpus is None:
        gpus = 1.0 if model.device == "cuda" else 0.0
    cpus = serving.rank_num_cpus
    if cpus is None:
        cpus = 1.0 if gpus else float(model.cpu_threads_per_rank)
    rank: dict[str, float] = {"CPU": cpus}
    if gpus:
        rank["GPU"] = gpus
    return [{"CPU": serving.replica_num_cpus}] + [dict(rank) for _ in range(model.tp_size)]


# Serve caps each gRPC message between its processes at 4 MiB, and a response body travels from
# the ingress to the HTTP proxy as one (with the ASGI messages queued before it): a bigger one,
# such as the listing of many long sessions, reached the client as a bare 500. Ray's actor
# calls, the path without gRPC, have no such cap; this lifts it to gRPC's largest.
GRPC_MESSAGE_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}


def replica_env_vars(serving: ServingConfig) -> dict[str, str]:
    """Serve settings read in each replica process at its start, for ``runtime_env.env_vars`` of
    the ingress and LLM deployments (``serving.replica_event_loop``)."""
    env = dict(GRPC_MESSAGE_ENV)  # the ingress -> LLMServer hop is gRPC on any cluster
    if serving.replica_event_loop == "main":
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
        env["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "0"
    return env


# Read by Serve's HTTP proxy, so set for the whole cluster before it starts (`ray start`, or the
# launcher's ray.init): the proxy streams to the ingress over gRPC instead of Ray actor calls,
# about 2 ms less to the first token (docs/performance.md), with gRPC's message cap lifted as
# for the replicas (``GRPC_MESSAGE_ENV``). It changes nothing else.
SERVE_CLUSTER_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1", **GRPC_MESSAGE_ENV}


def serve_cluster_env(serving: ServingConfig) -> dict[str, str]:
    """Serve settings of the whole cluster (the controller, the proxy and every replica read
    them at their start), set before Ray starts: ``SERVE_CLUSTER_ENV``, and with
    ``serving.direct_ingress`` Serve's direct ingress with its one port pinned to
    ``serving.port``."""
    env = dict(SERVE_CLUSTER_ENV)
    if serving.direct_ingress:
        env.update(
            {
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                # Serve allocates from range(MIN, MAX): exactly serving.port.
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(serving.port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(serving.port + 1),
                # Serve holds a freed port back 150 s (for HAProxy's stale workers) and keeps a
                # stopping ingress open 30 s (for a load balancer to deregister it): neither is
                # in front here, and with one port either would keep a restarted ingress (or
                # Ctrl-C) waiting that long.
                "RAY_SERVE_PORT_QUARANTINE_S": "0",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            }
        )
    return env


def replica_scaling(serving: ServingConfig) -> dict[str, Any]:
    """Serve options sizing one model's deployment: a fixed count or autoscaling bounds."""
    if serving.min_replicas == serving.max_replicas:
        return {"num_replicas": serving.max_replicas}
    return {
        "autoscaling_config": serve_autoscaling_config(
            serving.autoscaling,
            serving.min_replicas,
            serving.max_replicas,
            serving.target_ongoing_requests,
        )
    }


__all__ = [
    "GRPC_MESSAGE_ENV",
    "SERVE_CLUSTER_ENV",
    "ServingConfig",
    "LiveConfig",
    "hash_api_key",
    "replica_bundles",
    "replica_env_vars",
    "replica_scaling",
    "serve_cluster_env",
]
