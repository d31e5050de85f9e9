"""``m-ai checkpoint pull|list|verify|remove|publish`` and ``m-ai plan``.

Mounted by ``deployments/cli/main.py``::

    app.add_typer(checkpoint_app, name="checkpoint")
    app.command("plan")(plan)
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cluster.checkpoints.manifest import CheckpointRef, is_ref, parse_ref
from cluster.checkpoints.store import CheckpointStore, split_ref_text
from cluster.errors import MAIError

checkpoint_app = typer.Typer(
    help="Versioned checkpoints: pull (verified, resumable), list, verify, remove, publish.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

CacheOption = typer.Option(None, "--cache", help="Local checkpoint cache (default ~/.cache/m-ai/checkpoints).")


def _fail(exc: MAIError, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
    return typer.Exit(code)


class RichPullProgress:
    """A rich progress bar over the bytes of a pull (``cluster.checkpoints.pull.PullProgress``)."""

    def __init__(self, console: Console = err_console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def start(self, ref: CheckpointRef, total_bytes: int, files: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(f"{ref} ({files} files)", total=total_bytes)

    def advance(self, path: str, nbytes: int) -> None:
        self.progress.update(self.task, advance=nbytes)

    def finish(self) -> None:
        self.progress.stop()


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


@checkpoint_app.command("pull")
def pull(
    source: str = typer.Argument(
        ..., help="STORE_URI/NAME@VERSION (s3://, gs://, file://, path), hf://ORG/REPO[@REVISION], or a local directory."
    ),
    as_ref: str | None = typer.Option(None, "--as", help="NAME@VERSION for a local directory or a Hub repository."),
    cache: Path | None = CacheOption,
    workers: int = typer.Option(4, min=1, max=64, help="Files downloaded in parallel."),
    retries: int = typer.Option(1, min=0, max=10, help="Fresh downloads of a file that fails verification."),
    token: str | None = typer.Option(None, envvar="HF_TOKEN", help="Hugging Face token (gated Llama 2 repositories)."),
) -> None:
    """Bring a checkpoint version into the local cache, verifying every file by sha256."""
    from cluster.checkpoints.pull import pull_checkpoint

    store = CheckpointStore.local_cache(cache)
    started = time.perf_counter()
    try:
        if source.startswith("hf://"):
            from cluster.checkpoints.hub import pull_from_hub
            from cluster.checkpoints.resolve import parse_location

            loc = parse_location(source)
            name = parse_ref(as_ref).name if as_ref else None
            result = pull_from_hub(loc.repo_id, store, revision=loc.revision, name=name, token=token,
                                   retries=retries, progress=RichPullProgress())
        elif Path(source).expanduser().is_dir() and not is_ref(Path(source).name):
            if not as_ref:
                raise typer.BadParameter("a local directory needs --as NAME@VERSION", param_hint="--as")
            manifest = store.publish(Path(source).expanduser(), as_ref, source=Path(source).resolve().as_uri())
            console.print(f"imported {manifest.ref}: {len(manifest.files)} files, {_human(manifest.total_bytes)}")
            return
        else:
            split = split_ref_text(source)
            if split is None:
                raise typer.BadParameter(f"{source!r} is no STORE/NAME@VERSION, hf:// or directory", param_hint="SOURCE")
            result = pull_checkpoint(CheckpointStore.from_uri(split[0]), split[1], store, workers=workers,
                                     retries=retries, progress=RichPullProgress())
    except MAIError as exc:
        raise _fail(exc) from None
    console.print(
        f"{result.ref} -> {result.path}\n"
        f"  downloaded {_human(result.downloaded_bytes)} ({len(result.fetched)} files), resumed "
        f"{_human(result.resumed_bytes)}, reused {len(result.reused)} files from other versions, "
        f"{len(result.present)} already present; {time.perf_counter() - started:.1f} s"
    )


@checkpoint_app.command("list")
def list_checkpoints(
    cache: Path | None = CacheOption,
    store: str | None = typer.Option(None, "--store", help="List a store (s3://, gs://, path) instead of the cache."),
) -> None:
    """Checkpoint versions with their size, file count, creation time and source."""
    try:
        target = CheckpointStore.from_uri(store) if store else CheckpointStore.local_cache(cache)
        manifests = target.manifests()
    except MAIError as exc:
        raise _fail(exc) from None
    tiny = [] if store else _tiny_checkpoints(Path(target.root))
    table = Table(title=f"checkpoints in {target.uri}")
    for column in ("checkpoint", "files", "size", "created", "source"):
        table.add_column(column)
    for m in manifests:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
        table.add_row(str(m.ref), str(len(m.files)), _human(m.total_bytes), created, m.source)
    for row in tiny:
        table.add_row(*row)
    console.print(table)
    if not manifests and not tiny:
        console.print("no checkpoints yet: m-ai checkpoint pull SOURCE")


def _tiny_checkpoints(root: Path) -> list[tuple[str, ...]]:
    """Rows for the tiny checkpoints made by M-AI in the cache folder (``tiny-v1``: the one
    ``model_size: tiny`` loads). They are plain directories, not store versions."""
    from engine.tiny.checkpoint import MARKER_FILE

    rows = []
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        marker = directory / MARKER_FILE
        if not marker.is_file():
            continue
        files = [f for f in directory.rglob("*") if f.is_file()]
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(marker.stat().st_mtime))
        rows.append((
            directory.name, str(len(files)), _human(sum(f.stat().st_size for f in files)), created,
            "make-tiny: random weights, for tests and demos",
        ))
    return rows


@checkpoint_app.command("verify")
def verify(
    ref: str = typer.Argument(..., help="NAME@VERSION in the cache, or STORE_URI/NAME@VERSION."),
    cache: Path | None = CacheOption,
) -> None:
    """Hash every file again and compare it with the manifest; exit 1 when one differs."""
    from cluster.checkpoints.pull import verify_local

    try:
        split = split_ref_text(ref) if not is_ref(ref) else None
        if split is not None:
            target, checkpoint = CheckpointStore.from_uri(split[0]), split[1]
            problems = target.verify(checkpoint)
        else:
            target, checkpoint = CheckpointStore.local_cache(cache), parse_ref(ref)
            problems = verify_local(target, checkpoint)
        manifest = target.manifest(checkpoint)
    except MAIError as exc:
        raise _fail(exc) from None
    if problems:
        for problem in problems:
            err_console.print(f"[red]bad[/red] {problem}", highlight=False)
        err_console.print(f"{checkpoint}: {len(problems)} of {len(manifest.files)} files fail; pull it again")
        raise typer.Exit(1)
    console.print(f"{checkpoint}: {len(manifest.files)} files, {_human(manifest.total_bytes)}, all match sha256")


@checkpoint_app.command("remove")
def remove(
    ref: str = typer.Argument(..., help="NAME@VERSION to delete."),
    cache: Path | None = CacheOption,
    store: str | None = typer.Option(None, "--store", help="Remove from a store instead of the cache."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete one version (other versions, and files they share, stay)."""
    try:
        target = CheckpointStore.from_uri(store) if store else CheckpointStore.local_cache(cache)
        checkpoint = parse_ref(ref)
        manifest = target.manifest(checkpoint)
        if not yes:
            typer.confirm(f"remove {checkpoint} ({_human(manifest.total_bytes)}) from {target.uri}?", abort=True)
        target.remove(checkpoint)
    except MAIError as exc:
        raise _fail(exc) from None
    console.print(f"removed {checkpoint} from {target.uri}")


@checkpoint_app.command("publish")
def publish(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="A checkpoint directory (HF layout)."),
    ref: str = typer.Argument(..., help="NAME@VERSION to publish it as."),
    store: str = typer.Option(..., "--store", help="Destination store: s3://bucket/prefix, gs://..., or a path."),
) -> None:
    """Upload a checkpoint directory to a store as a new version (files an older version has are copied in-store)."""
    try:
        manifest = CheckpointStore.from_uri(store).publish(directory, ref)
    except MAIError as exc:
        raise _fail(exc) from None
    console.print(f"published {manifest.ref}: {len(manifest.files)} files, {_human(manifest.total_bytes)}")


def plan(
    model: str = typer.Option("7B", "--model", "-m", help="7B, 13B, 70B or tiny."),
    variant: str = typer.Option("chat", help="base or chat."),
    machine: str | None = typer.Option(
        None, help="1x24, 8x80, 2x8x80 (nodes x GPUs x GiB), cpu:64:16 (GiB:cores); default: this machine."
    ),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    quantization: str | None = typer.Option(None, help="8bit or 4bit; default none (the planner may fall back)."),
    context_length: int = typer.Option(4096, "--context", min=16, help="Tokens per sequence."),
    batch: int = typer.Option(32, min=1, help="Wanted sequences in the running batch (max_num_seqs)."),
    max_batched_tokens: int = typer.Option(2048, min=1, help="Tokens per engine step."),
    fallback: bool = typer.Option(True, help="Allow quantization, a smaller batch or bfloat16 when memory is short."),
) -> None:
    """Choose tp_size, replicas and the KV cache budget for a model on a machine, as a table."""
    from cluster.planner import Machine, PlanRequest, local_machine, plan_deployment, render_plan

    try:
        target = Machine.parse(machine) if machine else local_machine()
        result = plan_deployment(target, PlanRequest(
            model_size=model, model_variant=variant, dtype=dtype,
            quantization=None if quantization in (None, "none", "null") else quantization,
            context_length=context_length, max_num_seqs=batch, max_batched_tokens=max_batched_tokens,
            allow_fallback=fallback,
        ))
    except MAIError as exc:
        raise _fail(exc, code=2) from None
    except KeyError as exc:
        err_console.print(f"[red]error:[/red] {exc.args[0]}", highlight=False)
        raise typer.Exit(2) from None
    console.print(render_plan(result), highlight=False, soft_wrap=True)
