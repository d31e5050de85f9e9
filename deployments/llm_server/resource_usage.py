"""Resource usage of the processes of a replica: CPU, resident memory, GPU memory, KV bytes.

``ProcessSampler`` reads a process by pid with psutil (CPU percent since the previous sample
of that pid, 100 = one core; resident memory), and GPU memory per pid through NVML where
NVIDIA's driver library is present (``nvidia-ml-py``; otherwise None). A replica samples
itself and its rank actors: they share its node (the placement group is STRICT_PACK).
``kv_cache_bytes`` is the KV cache one rank reserves, from the model's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.logging_setup import get_logger

log = get_logger("deployments.llm_server.resource_usage")


@dataclass(frozen=True)
class ProcessUsage:
    pid: int
    cpu_percent: float
    rss_bytes: int
    gpu_bytes: int | None


class ProcessSampler:
    """Samples processes by pid; keeps psutil handles so CPU percent covers the interval."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}
        self._nvml: Any = None
        self._nvml_tried = False

    def sample(self, pid: int) -> ProcessUsage | None:
        """Usage of ``pid``, or None when the process is gone."""
        import psutil

        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the interval
            return ProcessUsage(pid, proc.cpu_percent(None), proc.memory_info().rss, self._gpu_bytes(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None

    def _gpu_bytes(self, pid: int) -> int | None:
        nvml = self._nvml_module()
        if nvml is None:
            return None
        try:
            used = 0
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == pid and p.usedGpuMemory:
                        used += p.usedGpuMemory
            return used
        except Exception:
            return None

    def _nvml_module(self) -> Any:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # no NVIDIA driver or library: GPU memory is not reported
                self._nvml = None
        return self._nvml


def kv_cache_bytes(config: Any) -> int:
    """KV cache bytes one tensor-parallel rank of ``config`` (a ``ModelConfig``) reserves."""
    from cluster.catalog import architecture

    arch = architecture(config.model_size)
    dtype = config.dtype if config.dtype != "auto" else ("float16" if config.device == "cuda" else "float32")
    tokens = config.resolved_kv_cache_blocks() * config.kv_block_size
    return arch.kv_cache_bytes_per_token(dtype) * tokens // config.tp_size


__all__ = ["ProcessSampler", "ProcessUsage", "kv_cache_bytes"]
