"""Metrics, the timing breakdown and /v1/diagnostics, the response cache, autoscaling stats and
batch jobs, on the real Serve graph with the real tiny engine (paced: ``FaultyEngine``'s
``step_delay_s``, so that decode takes a known time whatever the machine)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import ray

from deployments.batch_jobs import run_batch
from deployments.diagnostics import metrics_endpoints
from deployments.protocol import ChatCompletionRequest
from tests.support.faulty_engine import FAULTY_ENGINE
from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-obs"  # a name of its own: metrics of other test apps do not mix in
STEP_S = 0.02
SLOW_DECODE = {"step_delay_s": STEP_S}  # 40 tokens: 0.8 s of decode


@pytest.fixture(scope="module")
def app(serve_cluster):
    config = app_config([{"name": MODEL}], metrics_interval_s=0.5, response_cache={"max_entries": 16})
    deployed = serve_cluster.deploy(
        config, prefix="obs", engine_cls=FAULTY_ENGINE, engine_options=SLOW_DECODE
    )
    yield deployed
    deployed.delete()


def chat(content: str, **fields) -> ChatCompletionRequest:
    """``ignore_eos``: exactly ``max_tokens`` tokens, whatever the random-weight model samples."""
    return ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": content}], ignore_eos=True, **fields
    )


def metrics_page() -> str:
    return "".join(httpx.get(url, timeout=10).text for url in metrics_endpoints())


def sample_values(page: str, name: str, **labels: str) -> list[float]:
    from cluster.observability.diagnosis import parse_exposition

    return [v for _, lbl, v in parse_exposition(page, [name]) if all(lbl.get(k) == x for k, x in labels.items())]


def test_requests_record_metrics_and_diagnostics_name_decode(app):
    for i in range(6):
        app.handle.chat.remote(chat(f"question {i}", max_tokens=40, temperature=0.7)).result()
    stats = app.llm(MODEL).record_autoscaling_stats.remote().result()
    assert set(stats) == {"m_ai_ttft_p90_s", "m_ai_queue_p90_s"} and stats["m_ai_ttft_p90_s"] > 0

    def exported() -> str | None:
        page = metrics_page()
        counts = sample_values(page, "ray_m_ai_e2e_request_latency_seconds_count", model=MODEL)
        rss = sample_values(page, "ray_m_ai_process_resident_memory_bytes", model=MODEL, actor="rank-0")
        return page if sum(counts) >= 6 and rss else None

    page = wait_until(exported, timeout_s=40, interval_s=1, what="M-AI metrics on Ray's endpoint")
    assert sum(sample_values(page, "ray_m_ai_generation_tokens_total", model=MODEL)) >= 6 * 40
    assert sum(sample_values(page, "ray_m_ai_time_to_first_token_seconds_count", model=MODEL)) >= 6
    assert sample_values(page, "ray_m_ai_kv_cache_bytes", model=MODEL, actor="rank-0")[0] > 0

    report = httpx.get(app.url + "/v1/diagnostics", params={"model": MODEL}, timeout=30).json()
    assert report["requests"] >= 6 and report["dominant"] == "decode", report
    assert report["mean_s"]["decode"] == pytest.approx(39 * STEP_S, rel=0.5)
    assert "tensor-parallel" in report["recommendation"]
    unknown = httpx.get(app.url + "/v1/diagnostics", params={"model": "nope"}, timeout=30)
    assert unknown.status_code == 404  # OpenAI's model_not_found


def test_deterministic_requests_are_answered_from_the_tenant_s_cache(app):
    rank0 = app.rank0(MODEL)
    request = chat("cache me", max_tokens=30, temperature=0.0)
    first = app.handle.chat.remote(request).result()
    generated = ray.get(rank0.stats.remote()).generated_tokens
    again = app.handle.chat.remote(request).result()
    assert again.choices[0].message.content == first.choices[0].message.content
    assert ray.get(rank0.stats.remote()).generated_tokens == generated  # no engine work
    app.handle.chat.remote(request, "another-tenant").result()
    assert ray.get(rank0.stats.remote()).generated_tokens == generated + 30  # tenants never share
    sampled = chat("cache me", max_tokens=30, temperature=0.9)
    app.handle.chat.remote(sampled).result()
    assert ray.get(rank0.stats.remote()).generated_tokens == generated + 60  # not deterministic

    def hits() -> float:
        return sum(sample_values(metrics_page(), "ray_m_ai_response_cache_requests_total", result="hit"))

    assert wait_until(hits, timeout_s=40, interval_s=1, what="cache hits exported") >= 1


def test_batch_job_runs_resumes_and_survives_bad_lines(app, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"n{i}"}], "max_tokens": 8,
                  "ignore_eos": True}}
        for i in range(10)
    ]
    lines.append({"custom_id": "wrong-model", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "nope", "prompt": "x"}})
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    seen: list[tuple[int, int]] = []
    summary = asyncio.run(run_batch(app.handle, src, out, concurrency=8, progress=lambda d, t: seen.append((d, t))))
    assert (summary.total, summary.succeeded, summary.failed, summary.skipped) == (12, 10, 2, 0)
    assert summary.completion_tokens == 80 and summary.completion_tokens_per_s > 0
    assert seen[-1] == (12, 12)
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["r3"]["response"]["status_code"] == 200
    assert results["r3"]["response"]["body"]["usage"]["completion_tokens"] == 8
    assert results["wrong-model"]["response"]["status_code"] == 404  # OpenAI's model_not_found
    assert results["line-12"]["error"]["code"] == "invalid_request"
    again = asyncio.run(run_batch(app.handle, src, out, concurrency=8))
    assert (again.skipped, again.succeeded, again.failed) == (12, 0, 0)
    assert len(out.read_text().splitlines()) == 12
