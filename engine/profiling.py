"""A torch profiler trace of the engine for N steps of a synthetic batch.

The engine core runs in its own thread, so the profiler records every thread
(``profile_all_threads``); CUDA activity is added where a GPU is present. The trace is a
Chrome trace JSON (open it in chrome://tracing or Perfetto); the summary lists the operators
that took the most time. ``m-ai profile`` is the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cluster.config import ModelConfig
from engine.tuning import Workload


def profile_engine(
    config: ModelConfig, steps: int, out: Path, workload: Workload | None = None, engine: Any = None
) -> tuple[Path, str]:
    """Profile ``steps`` engine steps; returns the trace path and a table of the top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    own = engine is None
    if own:
        from engine.engine import LLMEngine

        engine = LLMEngine.from_config(config)
    workload = workload or Workload(requests=config.max_num_seqs, max_tokens=max(steps, 8))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    try:
        requests = workload.build(engine.tokenizer.vocab_size)
        start_steps = engine.stats().steps
        with profile(activities=activities, record_shapes=True, experimental_config=threads) as prof:
            streams = [engine.submit(ids, params) for ids, params in requests]
            deadline = time.monotonic() + 600
            while engine.stats().steps - start_steps < steps and time.monotonic() < deadline:
                time.sleep(0.005)
        for s in streams:
            s.cancel()
    finally:
        if own:
            engine.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return out, table


__all__ = ["profile_engine"]
