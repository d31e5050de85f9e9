"""Batch jobs: a JSONL file of OpenAI requests through the deployed application.

``run_batch`` reads the requests (``cluster.batch_format``), keeps ``concurrency`` of them in
flight through the application's handle (the same ``Ingress.chat`` / ``Ingress.complete`` the
HTTP API calls, so the engines batch them like live traffic), and appends each result to the
output as soon as it is known (flushed: an interrupted job loses at most the requests in
flight). A rerun skips the ids whose result is final. A line that fails, to parse or to run,
gets an error result and never stops the job. ``m-ai batch run`` is the command line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.batch_format import (
    BadLine,
    BatchRequest,
    error_line,
    read_requests,
    result_line,
    resume,
)
from deployments.errors import as_mai_error
from deployments.ingress.auth import DEFAULT_TENANT

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class BatchSummary:
    total: int = 0
    skipped: int = 0  # final results from an earlier run
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "completion_tokens_per_s": round(self.completion_tokens_per_s, 1)}


async def _call(handle: Any, request: BatchRequest, tenant: str) -> tuple[int, dict[str, Any]]:
    body = {**request.body, "stream": False}
    body.pop("stream_options", None)
    method = handle.chat if request.url.endswith("chat/completions") else handle.complete
    try:
        response = await method.remote(body, tenant)
    except Exception as exc:  # every failure becomes this line's result
        err = as_mai_error(exc)
        return err.status_code, err.to_dict()
    return 200, response.model_dump(mode="json") if hasattr(response, "model_dump") else dict(response)


async def run_batch(
    handle: Any,
    in_path: Path,
    out_path: Path,
    *,
    concurrency: int = 64,
    tenant: str = DEFAULT_TENANT,
    progress: Progress | None = None,
) -> BatchSummary:
    """Run the job (see the module docstring); returns its summary."""
    done = resume(out_path)
    items = list(read_requests(in_path))
    summary = BatchSummary(total=len(items))
    todo = [i for i in items if i.custom_id not in done]
    summary.skipped = summary.total - len(todo)
    finished = summary.skipped
    if progress:
        progress(finished, summary.total)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    started = time.monotonic()
    with open(out_path, "a", encoding="utf-8") as out:

        def write(result: dict[str, Any]) -> None:
            nonlocal finished
            out.write(json.dumps(result) + "\n")
            out.flush()
            finished += 1
            if progress:
                progress(finished, summary.total)

        async def worker() -> None:
            while True:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if isinstance(item, BadLine):
                    summary.failed += 1
                    write(error_line(item.custom_id, item.message))
                    continue
                status, body = await _call(handle, item, tenant)
                if status == 200:
                    summary.succeeded += 1
                    usage = body.get("usage") or {}
                    summary.prompt_tokens += usage.get("prompt_tokens", 0)
                    summary.completion_tokens += usage.get("completion_tokens", 0)
                else:
                    summary.failed += 1
                write(result_line(item.custom_id, status, body))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    summary.elapsed_s = time.monotonic() - started
    return summary


__all__ = ["run_batch", "BatchSummary"]
