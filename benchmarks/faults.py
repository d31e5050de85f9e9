"""Faults as an operator meets them, on the real engine: processes killed by pid under load.

One local app (the tiny model at tensor-parallel size 2, sessions and memory on local disk),
then, in order:

- ``memories``: ``POST /v1/memories`` N times; after every 5th 200 the memory shard's process
  is killed at once. Every acknowledged id must read back afterwards.
- ``sessions``: N chat turns in one session; after every 5th 200 the session store shard's
  process is killed. The session must hold every acknowledged turn.
- ``rank_kill``: streams run, rank 1's process is killed. Measured: how long ``/health`` still
  says ok (``health_detect_s``), whether every stream ends (``hung_requests``), and the time
  until a chat answers 200 again (``rank_kill_recovery_s``).
- ``replica_kill``: the same with the model replica's own process (``replica_kill_recovery_s``).
  The app has one replica, so its streams have nowhere to be resumed within
  ``serving.migration.wait_s`` (set below its restart time): they end with a typed error.
- ``burst``: 1,000 chat requests at 50 concurrent (``burst_http_500``: answers 500 or another
  5xx than a designed 503).
- ``migration``: a second app with two replicas (tensor-parallel size 1, greedy). Each of N
  long streams (``ignore_eos``) is answered once without interruption, then again while the
  replica that streams it is killed by pid after its 20th chunk: the stream must go on from
  the other replica (``serving.migration``). ``migrated_streams_identical``: the fraction of
  those streams whose text and token count equal the uninterrupted answer; ``migration_s``:
  from the kill to the next chunk the client gets.

``tests/chaos`` (``make test-chaos``) runs this with fewer writes, a shorter burst and fewer
migrations, and asserts the targets.

    python benchmarks/faults.py --out faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import build_app_config  # noqa: E402
from tests.support.replica_metrics import per_replica, routed_to_both  # noqa: E402

MODEL = "m-ai-tiny"
MIGRATE_APP = "faults-migrate"
TARGETS = {"acknowledged_lost": 0, "hung_requests": 0, "health_detect_s": 2.0,
           "rank_vs_replica_recovery": 1.2, "burst_http_500": 0, "migrated_streams_identical": 1.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ask(content: str = "Tell me about llamas.", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def pid_of(name_part: str, app: str) -> int:
    """The pid of the live actor of ``app`` whose name contains ``name_part``."""
    import ray

    for info in ray._private.state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and app in name and name_part in name:
            return int(info["Pid"])
    raise LookupError(f"no live actor {name_part!r} of {app}")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def until_ok(call, timeout_s: float = 180.0, interval_s: float = 0.1) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if call().status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError("not serving again within the timeout")


def retry_503(call, tries: int = 200) -> httpx.Response:
    for _ in range(tries):
        answer = call()
        if answer.status_code != 503:
            return answer
        time.sleep(0.25)
    return answer


def memories_scenario(http: httpx.Client, app: str, n: int) -> dict[str, Any]:
    acked = []
    for i in range(n):
        answer = retry_503(lambda i=i: http.post("/v1/memories", json={"user": "fay", "text": f"The user owns {i + 2} kites."}))
        if answer.status_code == 200:
            acked.append(answer.json()["memory"]["id"])
            if (i + 1) % 5 == 0:
                kill(pid_of("::memory-0", app))
    lost = [m for m in acked if retry_503(lambda m=m: http.get(f"/v1/memories/{m}", params={"user": "fay"})).status_code != 200]
    return {"acknowledged": len(acked), "lost": len(lost), "kills": n // 5}


def sessions_scenario(http: httpx.Client, app: str, n: int) -> dict[str, Any]:
    sid = retry_503(lambda: http.post("/v1/sessions", json={})).json()["id"]
    acked = 0
    for i in range(n):
        answer = retry_503(lambda i=i: http.post("/v1/chat/completions", json=ask(f"turn {i}", max_tokens=4, session_id=sid)))
        if answer.status_code == 200:
            acked += 1
            if (i + 1) % 5 == 0:
                kill(pid_of("::sessions-0", app))
    stored = retry_503(lambda: http.get(f"/v1/sessions/{sid}")).json()
    user_turns = sum(1 for m in stored.get("messages") or [] if m["role"] == "user")
    return {"acknowledged": acked, "stored": user_turns, "lost": max(0, acked - user_turns), "kills": n // 5}


async def streams_through(url: str, kill_it, n: int = 4) -> dict[str, Any]:
    """``n`` long streams; once all have started, ``kill_it()``; then /health is polled until it
    stops saying ok, and the streams must end (with an error event) within 90 s."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = [asyncio.Event() for _ in range(n)]

        async def stream(i: int) -> str:
            body = ask(f"Tell me a long story ({i}).", max_tokens=1500, stream=True, temperature=0.8, seed=i)
            last = ""
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line:
                        last = line if line != "data: [DONE]" else last
                        started[i].set()
            return last

        tasks = [asyncio.create_task(stream(i)) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        kill_it()
        killed = time.monotonic()
        detect = None
        while time.monotonic() - killed < 60:
            if (await client.get("/health")).status_code != 200:
                detect = time.monotonic() - killed
                break
            await asyncio.sleep(0.02)
        done, pending = await asyncio.wait(tasks, timeout=90)
        for task in pending:
            task.cancel()
        typed = sum(1 for t in done if not t.exception() and '"error"' in t.result())
        return {"health_detect_s": detect, "hung": len(pending), "ended_with_error": typed,
                "streams": n, "killed_at": killed}


def fault_scenario(url: str, http: httpx.Client, pid: int) -> dict[str, Any]:
    result = asyncio.run(streams_through(url, lambda: kill(pid)))
    killed = result.pop("killed_at")
    until_ok(lambda: http.post("/v1/chat/completions", json=ask(max_tokens=4)))
    result["recovery_s"] = round(time.monotonic() - killed, 2)
    return result


async def burst(url: str, total: int, concurrency: int) -> dict[str, int]:
    statuses: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def one(i: int) -> None:
            async with gate:
                try:
                    code = str((await c.post("/v1/chat/completions", json=ask(f"burst {i}", max_tokens=8))).status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                statuses[code] = statuses.get(code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(total)))
    return statuses


def start(args: argparse.Namespace) -> tuple[str, str]:
    from ray import serve

    from deployments.app import build_app
    from deployments.cli.main import start_local_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start_local_ray(8, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    state = tempfile.mkdtemp(prefix="m-ai-faults-")
    config = build_app_config({
        "models": [{"tp_size": 2, "max_num_seqs": 16, "temperature": 0.0}],
        "serving": {"session_state_uri": f"{state}/sessions", "health_check_period_s": args.health_check_period_s,
                    "rank_num_cpus": 1.0, "max_ongoing_requests": 64,
                    # one replica, restarted in more than this: replica_kill takes the no-resume path
                    "migration": {"wait_s": 2.0}},
        "memory": {"storage_uri": f"{state}/memory", "embedder": "hashing"},
    }, "faults benchmark")
    serve.run(build_app(config, engine_cls=None), name="faults", route_prefix="/faults")
    return "faults", f"http://127.0.0.1:{port}/faults"


def start_migration_app(args: argparse.Namespace, url: str) -> str:
    """Two replicas of the tiny model (tensor-parallel size 1, greedy) in their own app."""
    from ray import serve

    from deployments.app import build_app

    state = tempfile.mkdtemp(prefix="m-ai-faults-migrate-")
    config = build_app_config({
        "models": [{"max_num_seqs": 8, "temperature": 0.0}],
        "serving": {"session_state_uri": f"{state}/sessions", "min_replicas": 2, "max_replicas": 2,
                    "health_check_period_s": args.health_check_period_s, "ingress_num_cpus": 0.1,
                    "replica_num_cpus": 0.1, "rank_num_cpus": 0.5},
        "memory": {"storage_uri": f"{state}/memory", "embedder": "hashing"},
    }, "faults benchmark (migration)")
    serve.run(build_app(config, engine_cls=None), name=MIGRATE_APP, route_prefix=f"/{MIGRATE_APP}")
    return url.rsplit("/", 1)[0] + f"/{MIGRATE_APP}"


def wait_for(predicate, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except httpx.HTTPError:  # the app is still coming up
            found = None
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


async def migrated_stream(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One stream of ``body``; after its 20th chunk the replica that runs it is killed by pid."""
    chunks: list[tuple[float, dict[str, Any]]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def read() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append((time.monotonic(), json.loads(line[len("data: "):])))

        task = asyncio.create_task(read())
        while len(chunks) < 20 and not task.done():
            await asyncio.sleep(0.02)
        busy = await asyncio.to_thread(
            wait_for, lambda: [r for r, n in per_replica(url, MODEL).items() if n >= 1], 30, "a busy replica")
        kill(pid_of(f"#{busy[0]}", MIGRATE_APP))
        killed, before = time.monotonic(), len(chunks)
        await asyncio.wait_for(task, 300)
    after = [at for at, _ in chunks if at > killed]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for _, c in chunks if c.get("choices"))
    usage = next((c["usage"] for _, c in reversed(chunks) if c.get("usage")), {})
    return {"text": text, "usage": usage, "errors": sum(1 for _, c in chunks if "error" in c),
            "chunks_before_kill": before, "chunks": len(chunks), "replica": busy[0],
            "migration_s": round(after[0] - killed, 3) if after else None}


def migration_scenario(url: str, n: int) -> dict[str, Any]:
    """``n`` streams, each answered once uninterrupted, then again while its replica is killed;
    between two, both replicas serve again (the killed one restarted)."""
    streams = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for i in range(n):
            # both replicas serve (the one killed before has restarted, and the ingress knows it)
            wait_for(lambda: routed_to_both(url, MODEL, ask(max_tokens=4)), 180, "requests reaching both replicas")
            body = ask(f"Tell me a long story ({i}).", max_tokens=400, ignore_eos=True, temperature=0.0)
            want = http.post("/v1/chat/completions", json=body).json()
            got = asyncio.run(migrated_stream(url, {**body, "stream": True, "stream_options": {"include_usage": True}}))
            got["identical"] = (
                got["errors"] == 0 and got["text"] == want["choices"][0]["message"]["content"]
                and got["usage"].get("completion_tokens") == want["usage"]["completion_tokens"]
                and got["usage"].get("prompt_tokens") == want["usage"]["prompt_tokens"]
            )
            streams.append({k: v for k, v in got.items() if k not in ("text", "usage")})
            log(f"  stream {i}: identical={got['identical']} migration_s={got['migration_s']}")
    identical = sum(1 for s in streams if s["identical"])
    times = [s["migration_s"] for s in streams if s["migration_s"] is not None]
    return {"streams": streams, "identical": identical, "n": n,
            "migration_s_max": max(times) if times else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("faults.json"))
    ap.add_argument("--writes", type=int, default=20, help="acknowledged writes per kind")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--migrations", type=int, default=3, help="streams whose replica is killed (two-replica app)")
    ap.add_argument("--health-check-period-s", type=float, default=10.0, help="Serve's (the config default)")
    args = ap.parse_args()
    app, url = start(args)
    out: dict[str, Any] = {"load_average": os.getloadavg()}
    with httpx.Client(base_url=url, timeout=120) as http:
        until_ok(lambda: http.post("/v1/chat/completions", json=ask(max_tokens=4)))
        log("memories ...")
        out["memories"] = memories_scenario(http, app, args.writes)
        log("sessions ...")
        out["sessions"] = sessions_scenario(http, app, args.writes)
        log("rank kill ...")
        from ray import serve

        from cluster.config import ModelConfig
        from deployments.app import deployment_name

        llm = serve.get_deployment_handle(deployment_name(ModelConfig(name=MODEL)), app)
        describe = llm.describe.remote().result()
        out["rank_kill"] = fault_scenario(url, http, int(describe["ranks"][1]["pid"]))
        log("replica kill ...")
        out["replica_kill"] = fault_scenario(url, http, pid_of("SERVE_REPLICA::" + app + "#llm-", app))
        log(f"burst of {args.burst} at {args.concurrency} ...")
        out["burst"] = asyncio.run(burst(url, args.burst, args.concurrency))
        log(f"migration of {args.migrations} streams ...")
        out["migration"] = migration_scenario(start_migration_app(args, url), args.migrations)
    rank, replica = out["rank_kill"], out["replica_kill"]
    out.update(
        acknowledged_lost=out["memories"]["lost"] + out["sessions"]["lost"],
        hung_requests=rank["hung"] + replica["hung"],
        health_detect_s=rank["health_detect_s"],
        rank_kill_recovery_s=rank["recovery_s"],
        replica_kill_recovery_s=replica["recovery_s"],
        rank_vs_replica_recovery=round(rank["recovery_s"] / replica["recovery_s"], 2),
        migrated_streams_identical=round(out["migration"]["identical"] / out["migration"]["n"], 3),
        migration_s_max=out["migration"]["migration_s_max"],
        burst_http_500=sum(v for k, v in out["burst"].items() if k.isdigit() and int(k) >= 500 and k != "503"),
        targets=TARGETS,
    )
    args.out.write_text(json.dumps(out, indent=2))
    for key in ("acknowledged_lost", "hung_requests", "health_detect_s", "rank_kill_recovery_s",
                "replica_kill_recovery_s", "rank_vs_replica_recovery", "migrated_streams_identical",
                "migration_s_max", "burst_http_500"):
        print(f"{key:28s} {out[key]}  (target {TARGETS.get(key, '-')})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
