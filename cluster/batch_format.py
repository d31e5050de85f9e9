"""The OpenAI Batch API's JSONL formats, and what makes a batch job resumable.

Input, one request per line::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one result per line (in completion order, matched by ``custom_id``)::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request that fails has its HTTP status and OpenAI error body in ``response``; a line that
cannot be read at all has ``response: null`` and ``error: {code, message}``. A rerun keeps the
results that are final (2xx, and 4xx other than 429: retrying them gives the same answer) and
runs the others again.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based, for messages
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line: int
    custom_id: str  # the line's custom_id when readable, else "line-N"
    message: str


def read_requests(path: Path) -> Iterator[BatchRequest | BadLine]:
    """Each line of ``path`` as a request, or as what is wrong with it (the job goes on)."""
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError as exc:
                yield BadLine(n, f"line-{n}", f"line {n} is not JSON: {exc}")
                continue
            if not isinstance(item, dict):
                yield BadLine(n, f"line-{n}", f"line {n} is not a JSON object")
                continue
            cid = item.get("custom_id")
            if not isinstance(cid, str) or not cid:
                yield BadLine(n, f"line-{n}", f"line {n}: custom_id must be a non-empty string")
                continue
            if cid in seen:
                yield BadLine(n, cid, f"line {n}: custom_id {cid!r} repeats an earlier line; make ids unique")
                continue
            seen.add(cid)
            method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
            if method != "POST" or url not in URLS:
                yield BadLine(n, cid, f"line {n}: method={method!r} url={url!r}; use POST and one of {', '.join(URLS)}")
            elif not isinstance(body, dict):
                yield BadLine(n, cid, f"line {n}: body must be a JSON object (the request)")
            else:
                yield BatchRequest(n, cid, url, body)


def result_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body},
        "error": None,
    }


def error_line(custom_id: str, message: str, code: str = "invalid_request") -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def is_final(result: dict[str, Any]) -> bool:
    """Whether a rerun keeps ``result`` (a retry would not change it)."""
    response = result.get("response")
    if response is None:
        return result.get("error") is not None  # an unreadable line stays unreadable
    code = response.get("status_code", 500)
    return 200 <= code < 300 or (400 <= code < 500 and code != 429)


def resume(out_path: Path) -> dict[str, dict[str, Any]]:
    """The final results already in ``out_path`` by custom_id; rewrites the file with only
    those (atomically), so that results to retry appear once after the rerun."""
    if not out_path.exists():
        return {}
    kept: dict[str, dict[str, Any]] = {}
    with open(out_path, encoding="utf-8") as f:
        for raw in f:
            try:
                item = json.loads(raw)
            except ValueError:
                continue  # a line cut by an interrupted run
            if isinstance(item, dict) and isinstance(item.get("custom_id"), str) and is_final(item):
                kept[item["custom_id"]] = item
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in kept.values():
            f.write(json.dumps(item) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return kept


__all__ = ["BatchRequest", "BadLine", "read_requests", "result_line", "error_line", "is_final", "resume", "URLS"]
