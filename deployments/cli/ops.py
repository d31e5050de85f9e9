"""Operations commands of ``m-ai``: diagnose, dashboards, batch, tune, profile.

Mounted by ``deployments/cli/main.py`` with ``app.add_typer(ops_app)`` (no name: the commands join
the top level)::

    m-ai diagnose --url http://127.0.0.1:8000        # or --prometheus http://127.0.0.1:9090
    m-ai dashboards write                              # ray_configs/grafana + ray_configs/prometheus
    m-ai dashboards push --url https://grafana.example --token $GRAFANA_TOKEN
    m-ai batch run requests.jsonl results.jsonl --app m-ai
    m-ai tune --seqs 4,8,16,32 --tokens 128,512 --ttft-objective 0.5 --plot out/tune.png
    m-ai profile --steps 20 --out out/engine-trace.json
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from cluster.errors import MAIError

ops_app = typer.Typer(add_completion=False, no_args_is_help=True)
dashboards_app = typer.Typer(help="Grafana dashboard and Prometheus configs.", no_args_is_help=True)
batch_app = typer.Typer(help="Batch jobs in the OpenAI Batch API format.", no_args_is_help=True)
ops_app.add_typer(dashboards_app, name="dashboards")
ops_app.add_typer(batch_app, name="batch")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAY_CONFIGS = PROJECT_ROOT / "ray_configs"


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        _fail(f"--{name}={text!r}: give positive integers separated by commas, e.g. 4,8,16")
    return values


# -- diagnose -----------------------------------------------------------------------------------


def _diagnose_prometheus(url: str, model: str | None, window_s: float) -> dict[str, Any]:
    import httpx

    from cluster.observability.diagnosis import EngineFigures, StageStats, diagnose
    from cluster.observability.metric_specs import prom

    sel = f'{{model="{model}"}}' if model else ""
    w = f"{int(window_s)}s"

    def query(expr: str) -> list[dict[str, Any]]:
        r = httpx.get(url.rstrip("/") + "/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def by_stage(suffix: str) -> dict[str, float]:
        rows = query(f"sum by (stage) (increase({prom('request_stage_seconds', suffix)}{sel}[{w}]))")
        return {row["metric"].get("stage", ""): float(row["value"][1]) for row in rows}

    def scalar(expr: str) -> float | None:
        rows = query(expr)
        return float(rows[0]["value"][1]) if rows else None

    sums, counts = by_stage("_sum"), by_stage("_count")
    stats = {s: StageStats(counts.get(s, 0.0), sums.get(s, 0.0)) for s in counts}
    figures = EngineFigures(
        kv_cache_usage=scalar(f"max({prom('kv_cache_usage_perc')}{sel})"),
        prefix_cache_hit_rate=scalar(f"avg({prom('prefix_cache_hit_rate')}{sel})"),
        requests_waiting=scalar(f"sum({prom('num_requests_waiting')}{sel})"),
    )
    return {**diagnose(stats, figures).as_dict(), "model": model, "window_s": window_s}


@ops_app.command()
def diagnose(
    url: str | None = typer.Option(None, help="The M-AI server: asks its /v1/diagnostics."),
    prometheus: str | None = typer.Option(None, help="A Prometheus that scrapes the cluster."),
    model: str | None = typer.Option(None, help="One model; default: all."),
    window: float = typer.Option(300.0, help="Look-back in seconds."),
    api_key: str | None = typer.Option(None, envvar="MAI_API_KEY", help="API key (or MAI_API_KEY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Where requests spend their time: the dominant stage and what to do about it."""
    import httpx

    from cluster.observability.diagnosis import Diagnosis, render

    if (url is None) == (prometheus is None):
        _fail("give exactly one of --url (the server) or --prometheus (a Prometheus)")
    try:
        if prometheus:
            report = _diagnose_prometheus(prometheus, model, window)
        else:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            params: dict[str, Any] = {"window_s": window, **({"model": model} if model else {})}
            r = httpx.get(url.rstrip("/") + "/v1/diagnostics", params=params, headers=headers, timeout=30)
            if r.status_code != 200:
                _fail(f"{url} answered {r.status_code}: {r.text[:300]}")
            report = r.json()
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url or prometheus}: {exc}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    fields = {k: report[k] for k in ("dominant", "requests", "mean_s", "share", "recommendation", "findings")}
    typer.echo(render(Diagnosis(**fields)))


# -- dashboards ---------------------------------------------------------------------------------


@dashboards_app.command("write")
def dashboards_write(
    out: Path = typer.Option(RAY_CONFIGS, help="The ray_configs directory to write into."),
    targets: str = typer.Option("127.0.0.1:8080", help="Ray metrics endpoints (host:port, comma-separated)."),
) -> None:
    """Write the Grafana dashboard JSON and the Prometheus scrape config and alert rules."""
    from cluster.config import load_config
    from cluster.observability.alerts import AlertThresholds, write_prometheus_configs
    from cluster.observability.dashboards import write_dashboard

    autoscaling = load_config(None).serving.autoscaling
    written = [write_dashboard(out / "grafana" / "m-ai.json")]
    written += write_prometheus_configs(
        out / "prometheus", AlertThresholds.from_autoscaling(autoscaling), targets.split(",")
    )
    for path in written:
        typer.echo(f"wrote {path}")


class GrafanaRefused(Exception):
    """Grafana answered the push with an error status (its message is in the text)."""


def push_dashboard(url: str, token: str, model: dict[str, Any], folder_uid: str | None = None) -> dict[str, Any]:
    """Create or replace the dashboard on a Grafana server: ``POST /api/dashboards/db`` of
    Grafana's HTTP API with a service account token, sent with httpx (the project's one HTTP
    client; no Grafana client library, whose dependencies replace urllib3)."""
    import httpx

    payload: dict[str, Any] = {"dashboard": {**model, "id": None}, "overwrite": True, "message": "m-ai dashboards push"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    answer = httpx.post(
        f"{url.rstrip('/')}/api/dashboards/db",
        json=payload,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        timeout=10.0,
    )
    if answer.status_code >= 400:
        try:
            detail = answer.json().get("message", answer.text)
        except ValueError:
            detail = answer.text
        raise GrafanaRefused(f"HTTP {answer.status_code}: {detail}")
    return answer.json()


@dashboards_app.command("push")
def dashboards_push(
    url: str = typer.Option(..., help="Grafana's base URL."),
    token: str = typer.Option(..., envvar="GRAFANA_TOKEN", help="A service account token (or GRAFANA_TOKEN)."),
    file: Path | None = typer.Option(None, help="Dashboard JSON; default: generated now."),
    folder_uid: str | None = typer.Option(None, help="Grafana folder to put it in."),
) -> None:
    """Upload the dashboard to Grafana (overwrites the one with the same uid)."""
    import httpx

    from cluster.observability.dashboards import build_dashboard


    model = json.loads(file.read_text()) if file else build_dashboard()
    try:
        answer = push_dashboard(url, token, model, folder_uid)
    except GrafanaRefused as exc:
        _fail(f"Grafana at {url} refused the dashboard: {exc}")
    except httpx.HTTPError as exc:
        _fail(f"Grafana at {url} could not be reached: {exc}")
    typer.echo(json.dumps(answer))


# -- batch --------------------------------------------------------------------------------------


@batch_app.command("run")
def batch_run(
    in_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Requests (JSONL)."),
    out_path: Path = typer.Argument(..., dir_okay=False, help="Results (JSONL); a rerun resumes it."),
    app_name: str = typer.Option("m-ai", "--app", help="The Serve application to send them to."),
    address: str = typer.Option("auto", help="The Ray cluster (ray.init address)."),
    concurrency: int = typer.Option(64, min=1, help="Requests in flight at once."),
    tenant: str = typer.Option("default", help="Tenant the requests run as."),
) -> None:
    """Run a JSONL file of requests through the deployed app; prints a JSON summary."""
    import ray
    from ray import serve
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from deployments.batch_jobs import run_batch

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    try:
        handle = serve.get_app_handle(app_name)
    except Exception as exc:
        _fail(f"no Serve application {app_name!r} on this Ray cluster ({exc}); deploy it or pass --app")
    with Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("batch", total=None)
        summary = asyncio.run(run_batch(
            handle, in_path, out_path, concurrency=concurrency, tenant=tenant,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        ))
    typer.echo(json.dumps(summary.as_dict()))


# -- tune and profile ---------------------------------------------------------------------------


def _model_config(config: Path | None, model: str | None):
    from cluster.config import load_config

    try:
        cfg = load_config(config)
    except MAIError as exc:
        _fail(exc.message)
    models = [m for m in cfg.models if model is None or m.served_name == model]
    if not models:
        _fail(f"model={model!r} is not in the config; have: {', '.join(m.served_name for m in cfg.models)}")
    return models[0]


@ops_app.command()
def tune(
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file (its first model)."),
    model: str | None = typer.Option(None, help="Which model of the config."),
    seqs: str = typer.Option("4,8,16,32", help="max_num_seqs values."),
    tokens: str = typer.Option("128,512,2048", help="max_batched_tokens values."),
    requests: int = typer.Option(32, min=1, help="Requests in the workload (sent at once)."),
    prompt_tokens: str = typer.Option("16,128", help="Prompt length range, min,max."),
    max_tokens: int = typer.Option(32, min=1, help="Output tokens per request."),
    ttft_objective: float = typer.Option(1.0, help="p90 time-to-first-token objective (s)."),
    plot_path: Path = typer.Option(Path("out/tune.png"), "--plot", help="Where to write the plot."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Sweep max_num_seqs x max_batched_tokens on the engine; print the best setting."""
    from engine.tuning import Workload, best, plot, sweep

    low_high = _ints(prompt_tokens, "prompt-tokens")
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        _fail(f"--prompt-tokens={prompt_tokens!r}: give min,max")
    base = _model_config(config, model)
    if base.model_size == "tiny" and base.checkpoint is None:
        from engine.tiny.checkpoint import ensure_tiny_checkpoint

        ensure_tiny_checkpoint()
    workload = Workload(requests=requests, prompt_tokens=(low_high[0], low_high[1]), max_tokens=max_tokens)
    results = sweep(
        base, _ints(seqs, "seqs"), _ints(tokens, "tokens"), workload,
        on_result=None if as_json else lambda r: typer.echo(
            f"max_num_seqs={r.max_num_seqs:<5} max_batched_tokens={r.max_batched_tokens:<6} "
            f"ttft p90 {r.ttft_p90_s:.3f}s  e2e p90 {r.e2e_p90_s:.3f}s  {r.tokens_per_s:.0f} tokens/s"),
    )
    choice, meets = best(results, ttft_objective)
    plot(results, plot_path, ttft_objective)
    if as_json:
        typer.echo(json.dumps({"results": [r.as_dict() for r in results], "best": choice.as_dict(),
                               "meets_objective": meets, "plot": str(plot_path)}))
        return
    verdict = "meets" if meets else "misses (no setting meets it; lowest TTFT shown)"
    typer.echo(f"best: max_num_seqs={choice.max_num_seqs} max_batched_tokens={choice.max_batched_tokens} "
               f"({verdict} the {ttft_objective}s objective); plot: {plot_path}")


@ops_app.command()
def profile(
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file (its first model)."),
    model: str | None = typer.Option(None, help="Which model of the config."),
    steps: int = typer.Option(20, min=1, help="Engine steps to record."),
    out: Path = typer.Option(Path("out/engine-trace.json"), help="Chrome trace to write."),
) -> None:
    """Record a torch profiler trace of the engine for N steps of a full batch."""
    from engine.profiling import profile_engine

    base = _model_config(config, model)
    if base.model_size == "tiny" and base.checkpoint is None:
        from engine.tiny.checkpoint import ensure_tiny_checkpoint

        ensure_tiny_checkpoint()
    path, table = profile_engine(base, steps, out)
    typer.echo(table)
    typer.echo(f"wrote {path} (open in chrome://tracing or ui.perfetto.dev)")


__all__ = ["ops_app", "push_dashboard"]
