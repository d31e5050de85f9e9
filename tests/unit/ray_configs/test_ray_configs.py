"""The operator files under ray_configs/: every Serve config is one ``serve deploy`` accepts and
its args build a valid M-AI application; GPU configs agree with the device planner on the
machine they name; the KubeRay manifest serves the same application as the 7B config; the
cluster launcher passes Ray's own schema. (Ray's schemas are imported; no Ray is started.)"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import AppConfig, build_app_config, plan_update
from cluster.config.serving import LiveConfig, replica_bundles
from cluster.errors import ConfigError
from cluster.planner import Machine, PlanRequest, plan_deployment
from deployments.app import deployment_name, llm_deployment_options
from tests.support.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "ray_configs"
SERVE_CONFIGS = sorted(CONFIG_DIR.glob("serve_*.yaml"))
GPU_CONFIGS = [p for p in SERVE_CONFIGS if p.stem.endswith("_gpu")]
KUBERAY = CONFIG_DIR / "kuberay_rayservice.yaml"
LAUNCHER = CONFIG_DIR / "cluster_launcher_aws.yaml"
IMPORT_PATH = "deployments.app:app_builder"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def kuberay_serve_config() -> dict[str, Any]:
    return yaml.safe_load(load(KUBERAY)["spec"]["serveConfigV2"])


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, load(p)) for p in SERVE_CONFIGS] + [(KUBERAY.name, kuberay_serve_config())]


def only_application(serve_config: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config["applications"]
    return app


def app_config_of(app: dict[str, Any]) -> AppConfig:
    return build_app_config(app["args"]["config"], f"args.config of {app['name']}")


def target_machine(path: Path) -> Machine:
    """The machine a GPU config is sized for, from its header line ``# Target machine: 8x80``."""
    found = re.search(r"^# Target machine: (\S+)", path.read_text(), re.MULTILINE)
    assert found, f"{path.name} names no '# Target machine: NxGiB' in its header"
    return Machine.parse(found.group(1))


def unknown_serve_keys(config: dict[str, Any]) -> list[str]:
    """Keys Serve's schemas do not know. Serve ignores them (a misspelled option would be
    dropped silently by ``serve deploy``), so the tests refuse them."""
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    def known(model: Any) -> set[str]:
        return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}

    bad = [k for k in config if k not in known(ServeDeploySchema)]
    bad += [
        f"http_options.{k}"
        for k in config.get("http_options", {})
        if k not in known(HTTPOptionsSchema)
    ]
    for app in config.get("applications", []):
        bad += [f"{app.get('name')}.{k}" for k in app if k not in known(ServeApplicationSchema)]
        for dep in app.get("deployments", []):
            bad += [f"{dep.get('name')}.{k}" for k in dep if k not in known(DeploymentSchema)]
    return bad


def planned(model: Any, machine: Machine) -> Any:
    """The planner's plan for ``model`` as written (no fallback: the batch and context must fit)."""
    return plan_deployment(
        machine,
        PlanRequest(
            model_size=model.model_size,
            model_variant=model.model_variant,
            dtype=model.dtype,
            quantization=model.quantization,
            context_length=model.context_length,
            max_num_seqs=model.max_num_seqs,
            max_batched_tokens=model.max_batched_tokens,
            allow_fallback=False,
        ),
    )


def test_the_configs_are_all_here():
    names = {p.name for p in SERVE_CONFIGS}
    assert "serve_tiny_cpu.yaml" in names
    assert {"serve_7b_gpu.yaml", "serve_13b_gpu.yaml", "serve_70b_gpu.yaml"} <= names
    assert KUBERAY.is_file() and LAUNCHER.is_file()


@pytest.mark.parametrize(
    "name,config", serve_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_serve_config_is_what_serve_deploy_accepts(name, config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert unknown_serve_keys(config) == []
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    # no working_dir: the package is installed on the cluster (a plain path would be refused)
    assert "working_dir" not in (app.runtime_env or {})


@pytest.mark.parametrize(
    "name,config", serve_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_args_build_the_application_and_overrides_name_its_deployments(name, config):
    app = only_application(config)
    cfg = app_config_of(app)
    built = {"ingress"} | {deployment_name(m) for m in cfg.models}
    overrides = app.get("deployments", [])
    assert overrides, f"{name}: no user_config for the model deployment"
    for override in overrides:
        assert override["name"] in built, f"{name}: {override['name']} is not deployed by the app"
        if "user_config" not in override:
            continue
        model = next(m for m in cfg.models if deployment_name(m) == override["name"])
        live = LiveConfig.model_validate(override["user_config"])
        update = plan_update(model, live.model)
        assert not update.needs_reload, (
            f"{name}: user_config changes {update.reload} (needs a reload)"
        )
    for model in cfg.models:
        options = llm_deployment_options(model, cfg.serving)
        assert options["placement_group_strategy"] == "STRICT_PACK"
        assert len(options["placement_group_bundles"]) == model.tp_size + 1
        assert options["max_ongoing_requests"] >= model.max_num_seqs


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_follow_the_planner_on_their_target_machine(path):
    machine = target_machine(path)
    assert machine.has_gpus
    cfg = app_config_of(only_application(load(path)))
    (model,) = cfg.models
    assert model.device == "cuda" and model.checkpoint, "GPU configs name the device and weights"
    plan = planned(model, machine)
    assert (plan.tp_size, plan.dtype, plan.quantization) == (
        model.tp_size,
        model.dtype,
        model.quantization,
    )
    bundles = replica_bundles(cfg.serving, model)
    assert [b.get("GPU", 0) for b in bundles] == [0] + [1.0] * model.tp_size
    serving = cfg.serving
    assert 1 <= serving.min_replicas <= serving.max_replicas <= plan.replicas, (
        f"{path.name}: max_replicas={serving.max_replicas}, but {machine.describe()} holds "
        f"{plan.replicas} replicas of tp_size {plan.tp_size}"
    )


def test_the_cpu_config_fits_the_documented_local_cluster():
    config = load(CONFIG_DIR / "serve_tiny_cpu.yaml")
    assert config["http_options"]["host"] == "127.0.0.1"
    cfg = app_config_of(only_application(config))
    (model,) = cfg.models
    assert model.model_size == "tiny" and model.device == "cpu"
    bundles = replica_bundles(cfg.serving, model)
    assert all("GPU" not in b for b in bundles)
    serving = cfg.serving
    needed = serving.max_replicas * sum(b["CPU"] for b in bundles)
    needed += serving.ingress_replicas * serving.ingress_num_cpus
    documented = int(
        re.search(r"--num-cpus=(\d+)", (CONFIG_DIR / "serve_tiny_cpu.yaml").read_text())[1]
    )
    assert needed <= documented


def test_kuberay_serves_the_7b_application_on_nodes_of_its_target_machine():
    import ray

    manifest = load(KUBERAY)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert kuberay_serve_config() == load(CONFIG_DIR / "serve_7b_gpu.yaml")

    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    machine = target_machine(CONFIG_DIR / "serve_7b_gpu.yaml")
    (gpu_group,) = cluster["workerGroupSpecs"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == machine.gpus_per_node
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # model replicas go to the GPU pods
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {8000, 8265} <= ports


def test_cluster_launcher_passes_rays_schema_and_offers_the_gpu_target_nodes():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    launcher = load(LAUNCHER)
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))

    gpu_nodes = [
        t for t in launcher["available_node_types"].values() if t["resources"].get("GPU", 0) > 0
    ]
    assert gpu_nodes, "no GPU node type"
    for path in GPU_CONFIGS:
        machine = target_machine(path)
        assert any(t["resources"]["GPU"] == machine.gpus_per_node for t in gpu_nodes), path.name
    assert launcher["docker"]["image"].split(":")[1].startswith(ray.__version__ + "-")
    assert any("pip install" in c and "m-ai" in c for c in launcher["setup_commands"])


def test_the_checks_above_refuse_broken_configs():
    """The checks bite: a misspelled Serve option, a wrongly typed one, an unknown M-AI field,
    and GPU shapes that do not match the planner are all caught."""
    from ray.serve.schema import ServeDeploySchema

    config = load(CONFIG_DIR / "serve_7b_gpu.yaml")
    typo = copy.deepcopy(config)
    typo["applications"][0]["deployments"][0]["user_confg"] = {}
    typo["http_option"] = {}
    assert unknown_serve_keys(typo) == ["http_option", "llm-llama-2-7b-chat.user_confg"]
    wrong_type = copy.deepcopy(config)
    wrong_type["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeDeploySchema.model_validate(wrong_type)

    unknown = copy.deepcopy(config)
    unknown["applications"][0]["args"]["config"]["models"][0]["tensor_parallel"] = 2
    with pytest.raises(ConfigError, match="tensor_parallel"):
        app_config_of(only_application(unknown))

    (model,) = app_config_of(only_application(config)).models
    machine = target_machine(CONFIG_DIR / "serve_7b_gpu.yaml")
    # 64 sequences of 4096 tokens need a second GPU per replica: tp_size 1 no longer matches
    bigger_batch = model.model_copy(update={"max_num_seqs": 64})
    assert planned(bigger_batch, machine).tp_size > bigger_batch.tp_size
    longer = model.model_copy(update={"max_num_seqs": 64, "context_length": 4096 * 2})
    with pytest.raises(ConfigError, match="context_length"):
        planned(longer, machine)


def test_replicas_run_request_code_on_their_own_loop_unless_told_otherwise():
    from deployments.app import ingress_deployment_options, llm_deployment_options

    def env_of(options: dict[str, Any]) -> dict[str, str]:
        return options["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})

    config = build_app_config({}, "defaults")
    model = config.models[0]
    for options in (llm_deployment_options(model, config.serving),
                    ingress_deployment_options(config.serving)):
        assert env_of(options) == {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",  # > 4 MiB bodies
        }
        assert options["ray_actor_options"]["num_cpus"] >= 0
    separate = build_app_config({"serving": {"replica_event_loop": "separate"}}, "separate")
    assert env_of(llm_deployment_options(model, separate.serving)) == {
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",
    }
    with pytest.raises(ConfigError, match="replica_event_loop"):
        build_app_config({"serving": {"replica_event_loop": "threads"}}, "bad")
