"""Batch job throughput: 500 chat requests as one batch job vs the same requests one by one.

Both go through the deployed application's handle (``deployments/batch_jobs.run_batch``; one
by one is the same runner with one request in flight), on a local Ray with one LLM replica.
The engine is the fake engine, paced like a batching GPU engine: every sequence decodes at
``--tokens-per-s`` whatever the batch size up to ``max_num_seqs`` (decode is memory-bound),
with a fixed time to first token; so the ratio measures what the serving path makes of
batching, not a model. Writes JSON (``--out``, with ``speedup``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cluster.net import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]



def write_requests(path: Path, n: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "m-ai-tiny", "max_tokens": max_tokens, "temperature": 0.7,
                    "messages": [{"role": "user", "content": f"Summarize ticket {i} in one line."}]}
            f.write(json.dumps({"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tokens-per-s", type=float, default=400.0)
    ap.add_argument("--first-token-s", type=float, default=0.02)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    import ray
    from ray import serve

    from cluster.config import build_app_config
    from deployments.app import FAKE_ENGINE, build_app
    from deployments.batch_jobs import run_batch

    temp = tempfile.mkdtemp(prefix="m-ai-bench-")
    ray.init(address="local", include_dashboard=False, num_cpus=8, _temp_dir=temp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        config = build_app_config({
            "models": [{"name": "m-ai-tiny", "max_num_seqs": 32, "max_queued_requests": 1024}],
            "serving": {"replica_num_cpus": 0.5, "rank_num_cpus": 1, "max_ongoing_requests": 64},
        }, "benchmark")
        options = {"tokens_per_s": args.tokens_per_s, "first_token_delay_s": args.first_token_s,
                   "tokenizer": "bytes", "repeat": True}
        serve.run(build_app(config, engine_cls=FAKE_ENGINE, engine_options=options), name="bench",
                  route_prefix="/bench")
        handle = serve.get_app_handle("bench")
        work = Path(temp)
        src = work / "requests.jsonl"
        write_requests(src, args.requests, args.max_tokens)
        asyncio.run(run_batch(handle, src, work / "warmup.jsonl", concurrency=8))  # warm the path
        results = {}
        for label, concurrency in (("batch_job", args.concurrency), ("one_by_one", 1)):
            out = work / f"{label}.jsonl"
            summary = asyncio.run(run_batch(handle, src, out, concurrency=concurrency))
            assert summary.succeeded == args.requests, summary
            results[label] = summary.as_dict()
            print(f"{label:<11} {summary.elapsed_s:7.1f}s  {summary.completion_tokens_per_s:8.0f} tokens/s "
                  f"({summary.succeeded} ok, {summary.failed} failed)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    speedup = results["batch_job"]["completion_tokens_per_s"] / results["one_by_one"]["completion_tokens_per_s"]
    report = {
        "engine": "fake engine, paced: every sequence decodes at tokens_per_s up to max_num_seqs=32",
        "requests": args.requests, "max_tokens": args.max_tokens, "tokens_per_s_per_sequence": args.tokens_per_s,
        "first_token_s": args.first_token_s, "concurrency": args.concurrency, "speedup": round(speedup, 2),
        **results,
    }
    print(f"batch job / one by one: {speedup:.1f}x tokens/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["batch job", "one by one"]
    values = [results["batch_job"]["completion_tokens_per_s"], results["one_by_one"]["completion_tokens_per_s"]]
    ax.bar(labels, values, color=["tab:green", "tab:gray"])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{args.requests} requests: {speedup:.1f}x")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
