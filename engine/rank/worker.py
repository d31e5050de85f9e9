"""One tensor-parallel rank: joins the process group, holds a weights rank and its KV cache.

A plain class with no Ray inside (the rank actor wraps it). Rank 0 runs the engine core and
calls ``execute`` each step, which broadcasts the step's inputs before running them; the other
ranks sit in ``serve_forever`` receiving the same inputs and running the same forward.
No Ray call is made per step: torch.distributed carries everything — the step messages on a
gloo control channel, the forward's all-reduces on the default group (gloo on the CPU, NCCL
on CUDA; ``engine.rank.control_channel``). Each rank picks its CUDA device from Ray's GPU ids and
``CUDA_VISIBLE_DEVICES`` before joining (``engine.rank.devices``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch

from cluster.config import ModelConfig
from cluster.errors import EngineDeadError
from cluster.logging_setup import get_logger
from engine.rank import step_messages as msg
from engine.rank.control_channel import ControlChannel, nccl_error_env
from engine.rank.devices import DeviceChoice, current_device_choice
from engine.rank.loader import (
    TORCH_DTYPES,
    disable_deepspeed_shm_allreduce,
    load_model,
    resolve_checkpoint,
)
from engine.rank.model_runner import ModelRunner

log = get_logger("engine.rank.worker")

# Followers wait at most this long for the next step on the control channel; rank 0 sends a
# heartbeat when idle well within it, so a silent rank 0 (or a dead peer) surfaces as an
# error, not a hang. The forward's all-reduces (default group) have the same timeout.
COLLECTIVE_TIMEOUT_S = 60.0
HEARTBEAT_S = 10.0



class TPWorker:
    """A tensor-parallel rank of one model replica."""

    def __init__(
        self,
        config: ModelConfig,
        rank: int = 0,
        world_size: int | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        checkpoint_dir: str | Path | None = None,
        *,
        gpu_ids: Sequence[int | str] | None = None,
        control_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        """``gpu_ids``: what ``ray.get_gpu_ids()`` returned in this rank's actor (None outside
        Ray); ``engine.rank.devices.choose_device`` turns it into this rank's CUDA index."""
        self.config = config
        self.rank = rank
        self.world_size = world_size or config.tp_size
        self.master_addr = master_addr
        self.master_port = master_port
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.gpu_ids = list(gpu_ids) if gpu_ids else []
        self.control_timeout_s = control_timeout_s
        self.runner: ModelRunner | None = None
        self.device = torch.device("cpu")
        self.device_choice: DeviceChoice | None = None
        self.control: ControlChannel | None = None
        self._distributed = False
        self._alive = False

    # -- start and stop ---------------------------------------------------------------------

    def load(self) -> None:
        """Join the process group (blocks until every rank joins) and load this rank."""
        cfg = self.config
        device = cfg.resolved_device()
        if device == "cpu":
            torch.set_num_threads(cfg.cpu_threads_per_rank)
        path = self.checkpoint_dir or resolve_checkpoint(cfg)
        # The device first: NCCL binds its communicator to the current CUDA device, and
        # DeepSpeed places this rank on cuda:LOCAL_RANK.
        self.device_choice = choice = current_device_choice(device, self.rank, self.gpu_ids)
        os.environ["LOCAL_RANK"] = str(choice.local_rank)
        if choice.index is not None:
            torch.cuda.set_device(choice.index)
            self.device = torch.device("cuda", choice.index)
        if self.world_size > 1:
            self._init_distributed(device)
        model = load_model(cfg, path, tp_size=self.world_size)
        self.runner = ModelRunner(
            model,
            num_blocks=cfg.resolved_kv_cache_blocks(),
            block_size=cfg.kv_block_size,
            tp_size=self.world_size,
            dtype=TORCH_DTYPES[cfg.resolved_dtype()],
            device=self.device,
        )
        self.checkpoint_path = path
        self._alive = True
        log.info(
            "rank ready",
            extra={
                "rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "gpu_id": choice.gpu_id, "kv_cache_mib": self.runner.kv_cache_bytes >> 20,
            },
        )

    def _init_distributed(self, device: str) -> None:
        if self.master_port is None:
            raise ValueError("master_port is required when world_size > 1")
        env = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.device_choice.local_rank),
            "WORLD_SIZE": str(self.world_size),
            # DeepSpeed's CPU all-reduce reads LOCAL_SIZE; without it every rank segfaults.
            "LOCAL_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }
        if device == "cuda":
            # a timed-out NCCL collective raises (EngineDeadError) instead of aborting the process
            env.update(nccl_error_env())
        os.environ.update(env)
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        disable_deepspeed_shm_allreduce()
        deepspeed.init_distributed(
            dist_backend="gloo" if device == "cpu" else "nccl",
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            rank=self.rank,
            world_size=self.world_size,
        )
        self._distributed = True
        # Step messages are CPU tensors: their own gloo group, whatever the forward's backend.
        self.control = ControlChannel.create(self.rank, self.control_timeout_s)

    def shutdown(self) -> None:
        """Rank 0: tell the followers to exit. Every rank: leave the process group."""
        if self._distributed and self.rank == 0 and self._alive:
            try:
                self.control.send(*msg.encode(msg.OP_SHUTDOWN))
            except Exception:  # a dead follower must not block shutting down the rest
                log.warning("could not tell followers to stop", exc_info=True)
        self._alive = False
        if self._distributed:
            try:
                # Through DeepSpeed, which also drops the groups it cached (AutoTP's): a later
                # engine in this process must not find a destroyed group there.
                import deepspeed.comm as ds_comm
                from deepspeed.inference.engine import InferenceEngine

                ds_comm.destroy_process_group()
                # init_inference caches its tensor-parallel group on the class
                InferenceEngine.inference_mp_group = None
            except Exception:
                pass
            self._distributed = False

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def vocab_size(self) -> int | None:
        """The logits width (the model's vocabulary, which may be padded beyond the
        tokenizer's); None before ``load``."""
        return None if self.runner is None else int(self.runner.model.config.vocab_size)

    # -- rank 0 -----------------------------------------------------------------------------

    def execute(self, plan: msg.StepPlan) -> torch.Tensor | None:
        """Run one step on every rank; logits rows: decode sequences, then prefill chunks.

        Chunks that do not complete a prompt still return a row (ignored by the caller).
        """
        if self._distributed:
            self._send(msg.OP_STEP, plan)
            try:
                return self._run(plan)
            except RuntimeError as exc:  # an all-reduce inside the forward lost a peer
                self._alive = False
                log.error("collective failed during the forward", exc_info=True)
                raise EngineDeadError(
                    "a tensor-parallel rank stopped answering during a forward step; the "
                    "replica is restarting"
                ) from exc
        return self._run(plan)

    def heartbeat(self) -> None:
        """Rank 0 when idle: prove liveness to the followers (and learn if one died)."""
        if self._distributed:
            self._send(msg.OP_HEARTBEAT)

    def _send(self, op: int, plan: msg.StepPlan | None = None) -> None:
        try:
            self.control.send(*msg.encode(op, plan))
        except EngineDeadError:  # ControlTimeoutError included: already says what happened
            self._alive = False
            raise
        except Exception as exc:
            self._alive = False
            raise EngineDeadError(f"a tensor-parallel rank stopped answering: {exc}") from exc

    # -- ranks > 0 --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Follow rank 0's steps until it says stop (or the group breaks)."""
        try:
            while True:
                header, payload = self.control.receive(msg.HEADER_LEN, msg.payload_len)
                op, plan = msg.decode(header, payload)
                if op == msg.OP_SHUTDOWN:
                    break
                if op == msg.OP_STEP:
                    self._run(plan)
        finally:
            self._alive = False
            log.info("follower stopped", extra={"rank": self.rank})

    # -- every rank -------------------------------------------------------------------------

    def _run(self, plan: msg.StepPlan) -> torch.Tensor | None:
        if not plan.decode_tokens and not plan.prefill:
            return None
        tokens = torch.tensor(plan.decode_tokens, device=self.device) if plan.decode_tokens else None
        return self.runner.forward(tokens, plan.decode_positions, plan.decode_tables, plan.prefill)
