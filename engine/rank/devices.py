"""Which device a tensor-parallel rank runs on, as a pure function of its environment.

Inside Ray every rank actor asks for ``num_gpus=1``; Ray then shows the process only its own
GPU through ``CUDA_VISIBLE_DEVICES`` (one entry, so CUDA calls it ``cuda:0`` whatever the
rank), and ``ray.get_gpu_ids()`` names the physical GPU it was given. Outside Ray
(``LLMEngine.from_config`` starting one process per rank on one machine) every process sees
the same GPUs and rank ``r`` takes the ``r``-th visible one.

``choose_device`` turns (the device kind, the rank, Ray's GPU ids, ``CUDA_VISIBLE_DEVICES``
and the count CUDA reports) into the CUDA index the rank must use. ``TPWorker`` applies it
before ``init_distributed``: ``LOCAL_RANK`` is set to that index, since DeepSpeed places
the rank on ``cuda:LOCAL_RANK``, and ``torch.cuda.set_device`` is called with it, since NCCL
binds each communicator to the current device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.errors import ConfigError


@dataclass(frozen=True)
class DeviceChoice:
    """Where one rank runs: ``kind`` is ``cpu`` or ``cuda``; ``index`` is the CUDA index in
    this process (None on the CPU); ``local_rank`` is what ``LOCAL_RANK`` is set to."""

    kind: str
    index: int | None
    local_rank: int
    gpu_id: str | None = None  # the physical GPU (Ray's id, or the visible-devices entry)

    @property
    def torch_device(self) -> str:
        return "cpu" if self.index is None else f"cuda:{self.index}"


def parse_visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries (None when the variable is unset).

    Entries are kept as strings: they may be indexes (``"0,3"``) or UUIDs (``"GPU-5f..."``).
    An empty string means no GPU is visible.
    """
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def choose_device(
    kind: str,
    rank: int,
    *,
    ray_gpu_ids: Sequence[int | str] | None = None,
    cuda_visible_devices: str | None = None,
    device_count: int | None = None,
) -> DeviceChoice:
    """The device of tensor-parallel rank ``rank`` (see the module docstring).

    - ``kind == "cpu"``: no CUDA index; ``local_rank`` stays the rank (DeepSpeed's CPU
      all-reduce reads it with ``LOCAL_SIZE``).
    - Ray gave this process GPUs (``ray_gpu_ids`` not empty): the rank uses the first one;
      its index is its position in ``CUDA_VISIBLE_DEVICES`` (Ray's isolation makes that 0),
      or the id itself when the variable is unset (isolation turned off).
    - No Ray ids: rank ``r`` uses the ``r``-th visible GPU.

    Raises ``ConfigError`` naming the values when the rank has no GPU to use.
    """
    if rank < 0:
        raise ValueError(f"rank={rank} is negative")
    if kind == "cpu":
        return DeviceChoice("cpu", None, rank)
    if kind != "cuda":
        raise ValueError(f"device kind {kind!r} is neither 'cpu' nor 'cuda'")
    visible = parse_visible_devices(cuda_visible_devices)
    ids = [str(i) for i in (ray_gpu_ids or [])]
    if ids:
        gpu = ids[0]
        if visible is None:
            index = _as_index(gpu, "ray.get_gpu_ids()")
        elif gpu in visible:
            index = visible.index(gpu)
        else:
            raise ConfigError(
                f"Ray gave rank {rank} GPU {gpu}, but CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} "
                f"does not list it; let Ray set CUDA_VISIBLE_DEVICES (do not override it in the "
                f"actor's runtime_env)",
                param="device",
            )
    else:
        available = len(visible) if visible is not None else device_count
        if available is not None and rank >= available:
            raise ConfigError(
                f"tensor-parallel rank {rank} needs GPU {rank}, but this process sees {available} "
                f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}, device_count={device_count}); "
                f"give it at least tp_size GPUs or lower tp_size",
                param="tp_size",
            )
        index = rank
        gpu = visible[rank] if visible is not None else str(rank)
    if device_count is not None and index >= device_count:
        raise ConfigError(
            f"rank {rank} would use cuda:{index}, but CUDA reports {device_count} device(s) "
            f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}); check the GPUs this process may see",
            param="device",
        )
    return DeviceChoice("cuda", index, index, gpu)


def _as_index(value: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"{source} gave GPU {value!r} and CUDA_VISIBLE_DEVICES is unset, so it cannot be "
            f"turned into a CUDA index; let Ray set CUDA_VISIBLE_DEVICES",
            param="device",
        ) from None


def current_device_choice(kind: str, rank: int, ray_gpu_ids: Sequence[int | str] | None) -> DeviceChoice:
    """``choose_device`` with this process's environment (and CUDA's device count on CUDA)."""
    import os

    count = None
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count()
    return choose_device(
        kind,
        rank,
        ray_gpu_ids=ray_gpu_ids,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device_count=count,
    )


__all__ = ["DeviceChoice", "choose_device", "current_device_choice", "parse_visible_devices"]
