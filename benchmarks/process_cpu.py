"""CPU seconds of the processes a serving benchmark drives, by role, between two snapshots.

On a small machine a serving path's tokens/s is decided by how the cores are shared: the
engine's forward passes against Ray's processes (the HTTP proxy, the ingress and LLMServer
replicas, rank 0's event loop). Per 1,000 output tokens, each role's CPU seconds show which
hop costs what, independently of other work on the machine (which changes tokens/s, not the
CPU a token costs).

Roles: this process (``client``: the benchmark's client, and on the ``engine`` path the
engine's step thread, counted apart as ``client.engine_thread``), and each worker process of
this benchmark's own Ray session (found under its raylet by the session's temp dir), named by
Ray's process title (``ServeReplica:bench:ingress``, ``RankActor``, ``ProxyActor``...). Rank 0's
process is split by thread too: its busiest Python thread is the engine's step loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass
class CpuSnapshot:
    by_role: dict[str, float]  # role -> CPU seconds (user + system) so far
    by_thread: dict[str, dict[int, float]]  # role -> thread id -> CPU seconds, where split


def _cpu(times) -> float:
    return times.user + times.system


def _role(proc: psutil.Process) -> str | None:
    """``ray::ServeReplica:bench:ingress.chat_stream`` -> ``ServeReplica:bench:ingress``."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if not cmd:
        return None
    title = cmd[0]
    if title.startswith("ray::"):
        name = title[len("ray::"):].split(" ", 1)[0]
        for method_sep in (".",):
            head, _, tail = name.rpartition(method_sep)
            if head and not tail[:1].isupper():  # "Actor.method": drop the method
                name = head
        return name if name not in ("IDLE", "") else None
    base = os.path.basename(title)
    if base in ("raylet", "gcs_server") or "dashboard" in " ".join(cmd[:3]):
        return base
    return None


class ProcessCpu:
    """Snapshots of CPU seconds per role (see the module docstring)."""

    def __init__(self, ray_temp_dir: str | None, engine_thread_id: int | None = None) -> None:
        self.me = psutil.Process()
        self.engine_thread_id = engine_thread_id
        self.raylet: psutil.Process | None = None
        self.gcs: psutil.Process | None = None
        if ray_temp_dir:
            for proc in psutil.process_iter(["name", "cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if ray_temp_dir not in cmd:
                    continue
                if proc.info["name"] == "raylet":
                    self.raylet = proc
                elif proc.info["name"] == "gcs_server":
                    self.gcs = proc
        self._seen: dict[int, tuple[psutil.Process, str]] = {}

    def _ray_processes(self) -> list[tuple[psutil.Process, str]]:
        procs: list[tuple[psutil.Process, str]] = []
        if self.raylet is None:
            return procs
        try:
            children = self.raylet.children(recursive=True)
        except psutil.NoSuchProcess:
            return procs
        for child in children:
            if child.pid not in self._seen:
                role = _role(child)
                if role is None:
                    continue  # an idle worker: named once it runs something
                self._seen[child.pid] = (child, role)
            procs.append(self._seen[child.pid])
        procs.append((self.raylet, "raylet"))
        if self.gcs is not None:
            procs.append((self.gcs, "gcs_server"))
        return procs

    def snapshot(self) -> CpuSnapshot:
        by_role: dict[str, float] = {}
        by_thread: dict[str, dict[int, float]] = {}
        threads = {t.id: t.user_time + t.system_time for t in self.me.threads()}
        by_role["client"] = _cpu(self.me.cpu_times())
        machine = psutil.cpu_times()
        # Every process on the machine, other people's work included: for reference only.
        by_role["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        if self.engine_thread_id in threads:
            by_role["client.engine_thread"] = threads[self.engine_thread_id]
        for proc, role in self._ray_processes():
            try:
                cpu = _cpu(proc.cpu_times())
                if role.startswith("RankActor"):
                    by_thread[role] = {t.id: t.user_time + t.system_time for t in proc.threads()}
            except psutil.NoSuchProcess:
                continue
            by_role[role] = by_role.get(role, 0.0) + cpu
        return CpuSnapshot(by_role, by_thread)

    def pids(self) -> dict[str, list[int]]:
        """Role -> process ids (for a profiler)."""
        self._ray_processes()
        out: dict[str, list[int]] = {"client": [self.me.pid]}
        for pid, (_, role) in self._seen.items():
            out.setdefault(role, []).append(pid)
        return out


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds per role between two snapshots; a rank process also as its busiest Python
    thread (``<role>.engine_thread``: the step loop) and the rest (``<role>.other_threads``)."""
    delta = {
        role: after.by_role[role] - before.by_role.get(role, 0.0) for role in after.by_role
    }
    for role, threads in after.by_thread.items():
        old = before.by_thread.get(role, {})
        spent = {tid: cpu - old.get(tid, 0.0) for tid, cpu in threads.items()}
        if not spent:
            continue
        busiest = max(spent.values())
        delta[f"{role}.engine_thread"] = busiest
        delta[f"{role}.other_threads"] = delta[role] - busiest
    return delta


def cpu_per_1k_tokens(results: dict, cpu_s: dict) -> dict[str, dict[str, dict[str, float]]]:
    """path -> streams -> role -> CPU seconds per 1,000 output tokens."""
    return {
        path: {
            str(c): {
                role: round(1000 * seconds / results[path][c]["tokens"], 4)
                for role, seconds in sorted(roles.items())
            }
            for c, roles in by_streams.items()
        }
        for path, by_streams in cpu_s.items()
    }


def print_cpu_table(cpu: dict[str, dict[str, dict[str, float]]]) -> None:
    """``cpu_per_1k_tokens``'s figures: a row per process, a column per path and streams."""
    columns = [(path, c) for path in cpu for c in cpu[path]]
    roles = sorted({role for path, c in columns for role in cpu[path][c]})
    print("\nCPU seconds per 1,000 output tokens")
    print(f"{'process':44}" + "".join(f"{f'{p}@{c}':>12}" for p, c in columns))
    for role in roles:
        print(f"{role[:44]:44}" + "".join(f"{cpu[p][c].get(role, 0.0):12.3f}" for p, c in columns))


__all__ = ["CpuSnapshot", "ProcessCpu", "cpu_delta", "cpu_per_1k_tokens", "print_cpu_table"]
