"""The two process groups of a tensor-parallel replica, and how their failures surface.

- The **control channel**: a gloo group of its own, created right after the default group,
  on the CPU and on CUDA alike. Rank 0 broadcasts each step's inputs on it
  (``engine.rank.step_messages``: CPU int64 tensors, which NCCL cannot carry). It has its own
  timeout: a follower that hears nothing from rank 0 for that long, or a rank 0 whose
  followers stop taking messages, raises ``ControlTimeoutError`` (an ``EngineDeadError``);
  a peer that went away raises ``EngineDeadError``.
- The **default group**, made by ``deepspeed.init_distributed``: gloo on the CPU, NCCL on
  CUDA. Only the forward's all-reduces (DeepSpeed AutoTP's row-parallel layers) use it.

NCCL's watchdog aborts the whole process when a collective times out, unless
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says otherwise. ``nccl_error_env`` gives the setting that
makes it abort only the communicator (mode 2, "clean up only"): the next collective or stream
wait then raises a ``DistBackendError`` (a ``RuntimeError``), which ``TPWorker`` turns into
``EngineDeadError`` so the replica is replaced instead of the process dying mid-request.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from cluster.errors import ControlTimeoutError, EngineDeadError

# Mode 2 = CleanUpOnly: abort the communicators, keep the process, raise on the next use.
NCCL_ASYNC_ERROR_HANDLING = "2"


def nccl_error_env() -> dict[str, str]:
    """The environment ``TPWorker`` sets before creating an NCCL group (see the docstring)."""
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ASYNC_ERROR_HANDLING}


def is_timeout(exc: BaseException) -> bool:
    """Whether a collective's exception is gloo's (or NCCL's) timeout, not a lost peer."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class ControlChannel:
    """Rank 0 -> every rank: a fixed-size int64 header, then an int64 payload (gloo)."""

    def __init__(self, group, rank: int, timeout_s: float) -> None:
        self.group = group
        self.rank = rank
        self.timeout_s = timeout_s

    @classmethod
    def create(cls, rank: int, timeout_s: float) -> ControlChannel:
        """Every rank calls this, in the same order relative to other ``new_group`` calls."""
        group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(group, rank, timeout_s)

    @property
    def backend(self) -> str:
        return torch.distributed.get_backend(self.group)

    def send(self, header: torch.Tensor, payload: torch.Tensor) -> None:
        """Rank 0: broadcast one message to every rank."""
        self._broadcast(header)
        if payload.numel():
            self._broadcast(payload)

    def receive(self, header_len: int, payload_len) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks > 0: the next message (``payload_len(header)`` gives its payload's length)."""
        header = torch.empty(header_len, dtype=torch.long)
        self._broadcast(header)
        n = payload_len(header)
        payload = torch.empty(n, dtype=torch.long)
        if n:
            self._broadcast(payload)
        return header, payload

    def _broadcast(self, tensor: torch.Tensor) -> None:
        try:
            torch.distributed.broadcast(tensor, src=0, group=self.group)
        except RuntimeError as exc:
            if is_timeout(exc):
                side = "no step message from rank 0" if self.rank else "the followers took no step message"
                raise ControlTimeoutError(
                    f"tensor-parallel rank {self.rank}: {side} within the control channel's "
                    f"{self.timeout_s:.0f}s timeout; a rank is stuck or dead, the replica restarts"
                ) from exc
            raise EngineDeadError(
                f"tensor-parallel rank {self.rank} lost the control channel: {exc}"
            ) from exc

    def destroy(self) -> None:
        try:
            torch.distributed.destroy_process_group(self.group)
        except Exception:  # the default group's teardown also removes it
            pass


__all__ = ["ControlChannel", "nccl_error_env", "is_timeout", "NCCL_ASYNC_ERROR_HANDLING"]
