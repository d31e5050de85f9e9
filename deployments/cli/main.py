"""The ``m-ai`` command line: serve, chat, config, checkpoint.

    m-ai serve                      # local Ray + the app on 127.0.0.1:8000 (the tiny model)
    m-ai chat                       # talk to it in the terminal (one server-side session)
    m-ai config validate FILE       # check a config file (and its --env overlay)
    m-ai config show [FILE]         # the effective config, after overlays and M_AI_ variables
    m-ai config hash-key            # the sha256 digest to put in serving.api_keys
    m-ai checkpoint make-tiny DIR   # write the tiny Llama 2 checkpoint (--default: the cache's)

``M_AI_...`` environment variables override config fields (``M_AI_SERVING__PORT=8001``); the
CLI applies them explicitly and logs each one. ``M_AI_ENV`` names the environment overlay.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cluster.config import AppConfig, build_model_config, env_overrides, load_config
from cluster.config.serving import (
    ServingConfig,
    hash_api_key,
    replica_bundles,
    serve_cluster_env,
)
from cluster.errors import MAIError
from cluster.logging_setup import setup_logging
from deployments.cli.memory import memory_app
from deployments.cli.models import checkpoint_app, plan
from deployments.cli.ops import ops_app
from deployments.cli.state import state_app
from engine.fake_engine import FAKE_ENGINE

# soft_wrap: long commands and messages stay on one line (copy-paste, grep).
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

app = typer.Typer(
    help="M-AI: Llama 2 serving on Ray Serve.", no_args_is_help=True, add_completion=False
)
config_app = typer.Typer(help="Check and show configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
# Command groups written next to their features; make-tiny joins the checkpoint group below.
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(state_app, name="state")
app.add_typer(memory_app, name="memory")
app.add_typer(ops_app)  # diagnose, dashboards, batch, tune, profile (top level)
app.command("plan")(plan)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENGINES = {"real": None, "fake": FAKE_ENGINE}


def _load(path: Path | None, env: str | None) -> AppConfig:
    """The config from ``path`` + overlay + ``M_AI_`` variables (each one logged), or exit 1."""
    env = env or os.environ.get("M_AI_ENV")
    if env_overrides(dict(os.environ)):
        for key in sorted(k for k in os.environ if k.startswith("M_AI_") and k != "M_AI_ENV"):
            console.print(f"[dim]config override from the environment: {key}[/dim]")
    try:
        return load_config(path, env=env, environ=dict(os.environ))
    except MAIError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None


# -- serve ------------------------------------------------------------------------------------


def _cpus_needed(config: AppConfig) -> int:
    s = config.serving
    total = s.ingress_num_cpus * s.ingress_replicas
    for m in config.models:
        total += s.max_replicas * sum(b["CPU"] for b in replica_bundles(s, m))
    return math.ceil(total)


def start_local_ray(
    num_cpus: int, log_to_driver: bool = True, serving: ServingConfig | None = None
) -> str:
    """Ray on this machine only: its own temp dir (returned), no dashboard, node address
    127.0.0.1, the cluster-wide Serve settings of ``serving`` (the defaults' without one; also
    used by the serving benchmarks)."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for key, value in serve_cluster_env(serving or ServingConfig()).items():  # an operator's own setting wins
        os.environ.setdefault(key, value)
    # Ray's workers import the project's packages from a source checkout too.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
    temp_dir = tempfile.mkdtemp(prefix="m-ai-ray-")
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _temp_dir=temp_dir,
             log_to_driver=log_to_driver)
    return temp_dir


def proxy_port(serving: ServingConfig) -> int:
    """The port of Serve's HTTP proxy: ``serving.port``, or with ``serving.direct_ingress``
    (the ingress replica owns that one; Serve still starts a proxy) a free one."""
    if not serving.direct_ingress:
        return serving.port
    from cluster.net import free_port

    return free_port(serving.host)


def command_path(name: str) -> str:
    """How to run the command ``name`` of this environment from the current directory in a
    fresh shell: ``.venv/bin/NAME`` in a clone set up by ``make``, an absolute path elsewhere,
    the bare name when the environment's ``bin`` is on PATH."""
    import shutil

    bin_dir = Path(sys.executable).parent
    if shutil.which(name) == str(bin_dir / name):
        return name
    try:
        return str((bin_dir / name).relative_to(Path.cwd()))
    except ValueError:
        return str(bin_dir / name)


def how_to_call(config: AppConfig, url: str) -> str:
    """What ``m-ai serve`` prints once the application is up: commands to try, each of which
    runs as printed in a fresh shell (tests/e2e/test_docs.py runs them)."""
    model = config.models[0].served_name
    auth = ' -H "Authorization: Bearer $KEY"' if config.serving.auth_enabled else ""
    key = '"$KEY"' if config.serving.auth_enabled else '"unused"'
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "stream": True}
    )
    return (
        f"[bold green]M-AI is serving[/bold green] {', '.join(m.served_name for m in config.models)} "
        f"at [bold]{url}[/bold] (OpenAI API under /v1, health at /health)\n\n"
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n\n"
        f'  {command_path("python")} -c \'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key={key}); '
        f'print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}])'
        f".choices[0].message.content)'\n\n"
        f"  {command_path('m-ai')} chat --url {url}      # /exit leaves the chat\n\n"
        f"Ctrl-C stops the server."
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file (YAML or JSON)."),
    env: str | None = typer.Option(None, help="Environment overlay: dev, staging or prod."),
    host: str | None = typer.Option(None, help="Overrides serving.host (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Overrides serving.port (default 8000)."),
    engine: str = typer.Option("real", help="real, or fake (no model: a quick demo of the API)."),
    app_name: str = typer.Option("m-ai", help="Serve application name (for serve.get_app_handle)."),
    max_tokens: int | None = typer.Option(
        None, min=1, help="Default answer length of every model (overrides models[*].max_tokens)."
    ),
) -> None:
    """Start a local Ray with the M-AI application and serve until Ctrl-C."""
    cfg = _load(config, env)
    setup_logging(cfg.log_format, cfg.log_level)
    if engine not in ENGINES:
        console.print(f"[red]error:[/red] --engine={engine!r}; use one of {', '.join(ENGINES)}")
        raise typer.Exit(2)
    serving = cfg.serving.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v}
    )
    models = cfg.models
    if max_tokens is not None:
        models = [build_model_config(**{**m.model_dump(), "max_tokens": max_tokens}) for m in models]
    cfg = cfg.model_copy(update={"serving": serving, "models": models})
    if engine == "real" and any(
        m.model_size == "tiny" and m.checkpoint is None for m in cfg.models
    ):
        from engine.tiny.checkpoint import ensure_tiny_checkpoint

        with console.status("Preparing the tiny checkpoint (made once, then cached)..."):
            ensure_tiny_checkpoint()

    import ray
    from ray import serve as ray_serve

    from deployments.app import build_app

    temp_dir = start_local_ray(max(os.cpu_count() or 1, _cpus_needed(cfg)), serving=serving)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ray_serve.start(http_options={"host": serving.host, "port": proxy_port(serving)})
        with console.status(f"Deploying {app_name} (replicas load their models)..."):
            ray_serve.run(
                build_app(cfg, engine_cls=ENGINES[engine]), name=app_name, route_prefix="/"
            )
        out.print(
            how_to_call(cfg, f"http://{serving.host}:{serving.port}"),
            highlight=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        try:
            # The application's replicas drain and stop; ray.shutdown() then stops Serve's
            # controller with the rest. (serve.shutdown() would leave the raylet printing
            # "Task ServeController.graceful_shutdown failed" for its own kill of the controller.)
            ray_serve.delete(app_name)
        except Exception as exc:  # the application may not have started
            console.print(f"[dim]{type(exc).__name__}: {exc}[/dim]")
        finally:
            ray.shutdown()
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)


# -- chat -------------------------------------------------------------------------------------


@app.command()
def chat(
    url: str = typer.Option("http://127.0.0.1:8000", help="The M-AI server."),
    model: str | None = typer.Option(None, help="Model name; default: the first one served."),
    api_key: str | None = typer.Option(
        None, envvar="MAI_API_KEY", help="API key (or MAI_API_KEY)."
    ),
    system: str | None = typer.Option(None, help="System prompt of the conversation."),
    max_tokens: int | None = typer.Option(None, help="Answer length limit."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (0: greedy)."),
) -> None:
    """Chat with a running server in the terminal; the server keeps the conversation.
    Commands: /reset starts over, /exit (or Ctrl-D) leaves."""
    from deployments.cli.chat_client import ChatClient, ChatError

    client = ChatClient(
        url,
        api_key=api_key,
        model=model,
        system_prompt=system,
        sampling={"max_tokens": max_tokens, "temperature": temperature},
    )
    try:
        name = client.connect()
    except ChatError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    out.print(
        f"[dim]chatting with {name} at {url} (session {client.session_id}); /reset, /exit[/dim]"
    )
    try:
        while True:
            try:
                text = out.input("[bold cyan]you>[/bold cyan] ").strip()
            except EOFError:
                break
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                client.reset()
                out.print("[dim]new conversation[/dim]")
                continue
            if not text:
                continue
            out.print("[bold magenta]m-ai>[/bold magenta] ", end="")
            try:
                for piece in client.send(text):
                    out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
                out.print()
            except ChatError as exc:
                out.print()
                console.print(f"[red]error:[/red] {exc}")
    finally:
        client.close()


# -- config -----------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(
    path: Path = typer.Argument(..., help="Config file (YAML or JSON)."),
    env: str | None = typer.Option(None, help="Also apply this environment overlay."),
) -> None:
    """Check a config file; exit 1 with the field, the value and the fix if it is invalid."""
    cfg = _load(path, env)
    models = ", ".join(f"{m.served_name} (tp_size={m.tp_size})" for m in cfg.models)
    out.print(
        f"[green]ok[/green]: {path} — models: {models}; serving on {cfg.serving.host}:{cfg.serving.port}"
    )


@config_app.command("show")
def config_show(
    path: Path | None = typer.Argument(None, help="Config file; none: the defaults."),
    env: str | None = typer.Option(None, help="Also apply this environment overlay."),
    fmt: str = typer.Option("yaml", "--format", help="yaml or json."),
) -> None:
    """Print the effective config (file + overlay + M_AI_ variables + defaults)."""
    cfg = _load(path, env)
    data: dict[str, Any] = cfg.model_dump(mode="json")
    if fmt == "json":
        out.print_json(json.dumps(data))
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@config_app.command("hash-key")
def config_hash_key(
    key: str | None = typer.Argument(None, help="The API key; asked for (hidden) when omitted."),
) -> None:
    """Print the sha256 digest of an API key, for serving.api_keys (digest: tenant)."""
    if key is None:
        key = typer.prompt("API key", hide_input=True)
    sys.stdout.write(hash_api_key(key) + "\n")


# -- checkpoint -------------------------------------------------------------------------------


@checkpoint_app.command("make-tiny")
def checkpoint_make_tiny(
    directory: Path | None = typer.Argument(None, help="Where to write the checkpoint."),
    default: bool = typer.Option(
        False,
        "--default",
        help="Make the one `m-ai serve` uses, in the default cache "
        "(~/.cache/m-ai/checkpoints/tiny-v1), unless it is there already.",
    ),
    seed: int = typer.Option(0, help="Seed of the random weights and of the tokenizer."),
) -> None:
    """Write the tiny Llama-2-architecture checkpoint (Hugging Face layout, random weights:
    for tests and demos) to DIRECTORY, or with --default to the default cache."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.tiny.checkpoint import ensure_tiny_checkpoint, make_tiny_checkpoint

    if (directory is None) == (not default):
        console.print("[red]error:[/red] give a DIRECTORY or --default (not both)")
        raise typer.Exit(2)
    if default and seed != 0:
        console.print("[red]error:[/red] the default checkpoint has seed 0; use a DIRECTORY for another seed")
        raise typer.Exit(2)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("checking the cache", total=None)

        def report(step: str, done: int, total: int) -> None:
            progress.update(task, description=step, completed=done, total=total)

        try:
            if default:
                path = ensure_tiny_checkpoint(progress=report)
            else:
                path = make_tiny_checkpoint(directory, seed=seed, progress=report)
        except MAIError as exc:
            progress.stop()
            console.print(f"[red]error:[/red] {exc.message}", highlight=False)
            raise typer.Exit(1) from None
    out.print(f"[green]tiny checkpoint[/green] {path} (random weights: answers are random text)",
              highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
