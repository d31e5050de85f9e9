"""The real engine with a fault switch, for tests of an engine step that raises.

``FaultyEngine`` is ``engine.engine:LLMEngine`` unchanged until a prompt contains
``FAULT_MARKER``; from then on every step of its rank-0 worker raises, as a CUDA error or a
broken kernel would. The engine core loop dies on the first such step and fails every request
in flight (like vLLM's ``EngineDeadError``), and the replica's health check fails.

Deploy it with ``engine_cls=FAULTY_ENGINE`` (a path the rank actors import: the repository
root is on their ``PYTHONPATH``, see ``serve_harness``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.engine import LLMEngine

FAULT_MARKER = "__step_fault__"
FAULTY_ENGINE = "tests.support.faulty_engine:FaultyEngine"


class InjectedStepFault(RuntimeError):
    """What the armed worker raises in place of a step."""


class FaultyEngine(LLMEngine):
    """``LLMEngine`` whose steps raise once a prompt holding ``FAULT_MARKER`` arrives."""

    armed: threading.Event

    @classmethod
    def from_worker(cls, worker: Any, config: Any) -> FaultyEngine:
        armed = threading.Event()
        step = worker.execute

        def execute(plan: Any) -> Any:
            if armed.is_set():
                raise InjectedStepFault("injected fault: the engine step raised")
            return step(plan)

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
