"""The whole M-AI application, wired in one screen.

    ingress (HTTP + handle API, N replicas) ──► LLMServer "llm-<model>" (one deployment per model)
       │  deployment actors: sessions-0..S-1          └─ per replica: placement group (STRICT_PACK)
       │  (the session store shards)                      bundle 0: the replica, 1..tp: RankActors
       │  and memory-0..M-1 (the memory shards, unless memory.enabled is false)

``build_app(config)`` returns the Serve application; ``app_builder(args)`` does the same from
a ``serve deploy`` YAML (``import_path: deployments.app:app_builder``, ``args: {config: ...}``).
Deployment options come from the config here; the classes stay plain.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cluster.config import AppConfig, ModelConfig, build_app_config, load_config
from cluster.config.memory import MemoryConfig
from cluster.config.serving import (
    SERVE_CLUSTER_ENV,
    LiveConfig,
    ServingConfig,
    replica_bundles,
    replica_env_vars,
    replica_scaling,
)
from cluster.errors import ConfigError
from engine.fake_engine import FAKE_ENGINE


def deployment_name(model: ModelConfig) -> str:
    return "llm-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model.served_name)


def replica_actor_options(num_cpus: float, serving: ServingConfig) -> dict[str, Any]:
    """``ray_actor_options`` of a replica: its CPUs and the Serve settings its process reads at
    start (``serving.replica_event_loop``; merged with the application's runtime_env)."""
    env = replica_env_vars(serving)
    return {"num_cpus": num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})}


SESSION_ROUTER = "deployments.llm_server.routing.SessionAffinityRouter"


def llm_deployment_options(
    model: ModelConfig, serving: ServingConfig, live: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Serve options of one model's deployment: resources, queue sizes, scaling, health, and
    its live configuration (``user_config``, a ``LiveConfig``)."""
    queued = serving.max_queued_requests
    return {
        "name": deployment_name(model),
        "ray_actor_options": replica_actor_options(serving.replica_num_cpus, serving),
        "placement_group_bundles": replica_bundles(serving, model),
        "placement_group_strategy": "STRICT_PACK",
        # The engine batches max_num_seqs; as many again wait in it for the next step boundary.
        "max_ongoing_requests": serving.max_ongoing_requests or 2 * model.max_num_seqs,
        "max_queued_requests": queued if queued is not None else max(1, model.max_queued_requests),
        "backpressure_config": {"status_code": 429, "retry_after_s": serving.retry_after_s},
        "health_check_period_s": serving.health_check_period_s,
        "health_check_timeout_s": serving.health_check_timeout_s,
        "graceful_shutdown_timeout_s": serving.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": serving.graceful_shutdown_wait_loop_s,
        "user_config": LiveConfig.model_validate(live or {}).model_dump(exclude_none=True),
        **replica_scaling(serving),
        **({"request_router_config": {"request_router_class": SESSION_ROUTER}} if serving.session_affinity else {}),
    }


def memory_storage_uri(memory: MemoryConfig, serving: ServingConfig) -> str | None:
    """``memory.storage_uri``, else a ``memory`` folder beside the session state
    (``.../sessions`` -> ``.../memory``; an object store URI keeps its query)."""
    if memory.storage_uri is not None:
        return memory.storage_uri
    base, sep, query = serving.session_state_uri.partition("?")
    parent = base.rstrip("/").rsplit("/", 1)[0] if "/" in base.rstrip("/") else "."
    return f"{parent}/memory{sep}{query}"


def memory_tokenizer(config: AppConfig) -> str | None:
    """The first model's local checkpoint directory: memory counts its windows with that
    tokenizer. None (a ~4 bytes per token estimate) for remote or embedded checkpoints; the
    LLMServer fits the prompt with the model's own tokenizer either way."""
    checkpoint = config.models[0].checkpoint
    if checkpoint and "://" not in checkpoint and Path(checkpoint).expanduser().is_dir():
        return str(Path(checkpoint).expanduser())
    return None


# Arrow's default allocator is mimalloc, whose first use keeps ~6 MB of arenas resident for
# a memory shard's few-KB Parquet files; the C library's malloc holds none of it. Read once,
# when the process first allocates through Arrow, so it is set for the actor's process.
MEMORY_ACTOR_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def memory_actors(config: AppConfig) -> list[Any]:
    """The memory shards as deployment actors of the ingress (none when memory is off)."""
    import ray
    from ray.serve.config import DeploymentActorConfig

    from actors.memory.shard import MemoryShard
    from deployments.ingress.stores.memory_client import memory_actor_name

    memory = config.memory
    if not memory.enabled:
        return []
    stored = memory.model_copy(update={"storage_uri": memory_storage_uri(memory, config.serving)})
    shard_cls = ray.remote(MemoryShard)
    return [
        DeploymentActorConfig(
            name=memory_actor_name(i),
            actor_class=shard_cls,
            init_kwargs={"config": stored, "shard": i, "tokenizer": memory_tokenizer(config)},
            actor_options={"num_cpus": 0, "runtime_env": {"env_vars": MEMORY_ACTOR_ENV}},
        )
        for i in range(memory.shards)
    ]


def ingress_deployment_options(
    serving: ServingConfig, extra_actors: list[Any] | None = None
) -> dict[str, Any]:
    """Serve options of the ingress, with the session store shards (and ``extra_actors``: the
    memory shards) as its deployment actors."""
    import ray
    from ray.serve.config import DeploymentActorConfig

    from actors.sessions.shard import SessionShard
    from deployments.ingress.stores.sessions import session_actor_name

    store_cls = ray.remote(SessionShard)
    return {
        "name": "ingress",
        "num_replicas": serving.ingress_replicas,
        "ray_actor_options": replica_actor_options(serving.ingress_num_cpus, serving),
        "max_ongoing_requests": serving.ingress_max_ongoing_requests,
        "graceful_shutdown_timeout_s": serving.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": serving.graceful_shutdown_wait_loop_s,
        "deployment_actors": [
            DeploymentActorConfig(
                name=session_actor_name(i),
                actor_class=store_cls,
                init_kwargs={
                    "root": serving.session_state_uri,
                    "shard": i,
                    "max_sessions": serving.max_sessions_per_shard,
                    # the store actor owns its process: freezing long-lived objects keeps
                    # full garbage collections from stalling group commits
                    "gc_freeze": True,
                },
                actor_options={"num_cpus": 0},
            )
            for i in range(serving.session_store_shards)
        ]
        + list(extra_actors or []),
    }


def check_cluster_env(serving: ServingConfig) -> None:
    """Refuse ``serving.direct_ingress`` on a cluster whose Serve was started without it: the
    setting is read by Serve's processes at their start, so the application cannot turn it on."""
    if serving.direct_ingress and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        raise ConfigError(
            "serving.direct_ingress=true, but this Ray cluster was started without Serve's direct "
            "ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): start it with `m-ai serve`, or set the "
            "variables of cluster.config.serving.serve_cluster_env on every `ray start` "
            "(docs/deployment.md), or set direct_ingress: false",
            param="serving.direct_ingress",
        )


def build_app(
    config: AppConfig,
    engine_cls: str | type | None = None,
    engine_options: dict[str, Any] | None = None,
    live: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The Serve application for ``config``. ``engine_cls``: None for the real engine
    (``engine.engine:LLMEngine``), or a class / ``"module:Class"`` path such as ``FAKE_ENGINE``,
    built with ``engine_options``. ``live``: model name -> its initial ``LiveConfig``."""
    from ray import serve

    from deployments.ingress.deployment import Ingress
    from deployments.llm_server.deployment import LLMServer

    serving = config.serving
    check_cluster_env(serving)
    models = {
        model.served_name: serve.deployment(LLMServer)
        .options(**llm_deployment_options(model, serving, (live or {}).get(model.served_name)))
        .bind(model, serving, engine_cls, engine_options, config.memory)
        for model in config.models
    }
    cards = [
        {"id": m.served_name, "created": 0, "context_length": m.context_length}
        for m in config.models
    ]
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        **ingress_deployment_options(serving, memory_actors(config))
    )
    return ingress.bind(models, cards, serving, config.output, config.memory)


def app_builder(args: dict[str, Any]) -> Any:
    """``serve deploy`` entry point. ``args``: ``config`` (a path to a YAML/JSON config, or the
    config as a mapping), optional ``env`` (dev, staging, prod), optional ``engine_cls``."""
    source = args.get("config")
    if isinstance(source, dict):
        config = build_app_config(source, "serve args: config")
    else:
        config = load_config(Path(source) if source else None, env=args.get("env"))
    return build_app(
        config, engine_cls=args.get("engine_cls"), engine_options=args.get("engine_options")
    )


__all__ = [
    "build_app",
    "check_cluster_env",
    "app_builder",
    "llm_deployment_options",
    "ingress_deployment_options",
    "memory_actors",
    "memory_storage_uri",
    "deployment_name",
    "FAKE_ENGINE",
    "SERVE_CLUSTER_ENV",
    "replica_actor_options",
]
