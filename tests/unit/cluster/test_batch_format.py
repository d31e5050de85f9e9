"""OpenAI Batch JSONL: reading requests, bad lines, and what a rerun keeps."""

from __future__ import annotations

import json

from cluster.batch_format import (
    BadLine,
    BatchRequest,
    error_line,
    is_final,
    read_requests,
    result_line,
    resume,
)


def test_good_and_bad_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    lines = [
        json.dumps(good), "", "{not json", json.dumps([1]), json.dumps({"method": "POST"}),
        json.dumps(good),  # repeated id
        json.dumps({**good, "custom_id": "b", "url": "/v1/embeddings"}),
        json.dumps({**good, "custom_id": "c", "body": "text"}),
        json.dumps({**good, "custom_id": "d", "url": "/v1/completions"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    items = list(read_requests(path))
    assert [type(i) for i in items] == [BatchRequest, BadLine, BadLine, BadLine, BadLine, BadLine, BadLine, BatchRequest]
    assert items[0].custom_id == "a" and items[-1].url == "/v1/completions"
    bad = {i.custom_id: i.message for i in items if isinstance(i, BadLine)}
    assert "not JSON" in bad["line-3"] and "repeats" in bad["a"] and "/v1/embeddings" in bad["b"]


def test_resume_keeps_final_results_once(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [
        result_line("ok", 200, {"x": 1}),
        result_line("bad", 400, {"error": {}}),
        result_line("busy", 429, {"error": {}}),
        result_line("dead", 503, {"error": {}}),
        error_line("line-3", "not JSON"),
    ]
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + '{"custom_id": "cut', encoding="utf-8")
    assert [is_final(r) for r in rows] == [True, True, False, False, True]
    kept = resume(out)
    assert set(kept) == {"ok", "bad", "line-3"}
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["ok", "bad", "line-3"]
    assert resume(tmp_path / "missing.jsonl") == {}
