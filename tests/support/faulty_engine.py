"""The real engine with a fault switch and a pace, for tests of faults and of slow streams.

``FaultyEngine`` is ``engine.engine:LLMEngine`` unchanged until a prompt contains
``FAULT_MARKER``; from then on every step of its rank-0 worker raises, as a CUDA error or a
broken kernel would. The engine core loop dies on the first such step and fails every request
in flight (like vLLM's ``EngineDeadError``), and the replica's health check fails.

``step_delay_s`` (an engine option) makes each step of the rank-0 worker last at least that
long: a stream then yields at most ``1 / step_delay_s`` tokens a second whatever the machine,
so a test can hang up, fill a queue or kill a process while a stream is surely still running.

Deploy it with ``engine_cls=FAULTY_ENGINE`` (a path the rank actors import: the repository
root is on their ``PYTHONPATH``, see ``serve_harness``) and, for a pace,
``engine_options={"step_delay_s": ...}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.engine import LLMEngine

FAULT_MARKER = "__step_fault__"
FAULTY_ENGINE = "tests.support.faulty_engine:FaultyEngine"


class InjectedStepFault(RuntimeError):
    """What the armed worker raises in place of a step."""


class FaultyEngine(LLMEngine):
    """``LLMEngine`` whose steps raise once a prompt holding ``FAULT_MARKER`` arrives, and
    last at least ``step_delay_s``."""

    armed: threading.Event

    @classmethod
    def from_worker(cls, worker: Any, config: Any, step_delay_s: float = 0.0) -> FaultyEngine:
        armed = threading.Event()
        step = worker.execute

        def execute(plan: Any) -> Any:
            if armed.is_set():
                raise InjectedStepFault("injected fault: the engine step raised")
            if not step_delay_s:
                return step(plan)
            started = time.monotonic()
            result = step(plan)
            time.sleep(max(0.0, step_delay_s - (time.monotonic() - started)))
            return result

        worker.execute = execute  # before the core loop starts calling it
        engine = super().from_worker(worker, config)
        engine.armed = armed
        return engine

    async def generate(
        self, prompt: str | list[int], params: Any = None, request_id: str | None = None
    ) -> AsyncIterator[Any]:
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(list(prompt))
        if FAULT_MARKER in text:
            self.armed.set()
        async for out in super().generate(prompt, params, request_id):
            yield out


__all__ = ["FaultyEngine", "FAULT_MARKER", "FAULTY_ENGINE", "InjectedStepFault"]
