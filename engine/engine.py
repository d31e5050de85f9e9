"""The engine's Python API, usable without Ray.

    engine = LLMEngine.from_config(ModelConfig(model_size="tiny", tp_size=2))
    for delta in engine.submit("Hello", SamplingParams(max_tokens=16)):
        print(delta.text, end="")
    engine.shutdown()

``from_config`` runs rank 0 (and the engine core loop, in a thread) in this process and
starts one process per further tensor-parallel rank (``python -m engine.rank.follower``: the
caller's script is not imported again, so it needs no ``if __name__ == "__main__":`` guard).
Inside Ray, the rank actors build the workers themselves and rank 0 calls ``from_worker``.
"""

from __future__ import annotations

import asyncio
import queue
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cluster.config import ModelConfig
from cluster.errors import EngineDeadError, MAIError
from cluster.logging_setup import get_logger
from cluster.net import free_port
from engine.core import EngineCore
from engine.rank import follower
from engine.rank.loader import resolve_checkpoint
from engine.rank.worker import TPWorker
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.types import (
    EngineStats,
    OutputSink,
    RequestOutput,
    SamplingParams,
    merge_deltas,
    new_request_id,
)

log = get_logger("engine")


class _SyncStream:
    """What ``submit`` returns: iterate the deltas; ``cancel()`` stops the request.

    ``result()`` asks for the whole output only: from then on the deltas are kept in a list
    and the waiting thread is woken once, by the last one, instead of once per token (32
    waiting threads woken every step took the GIL from the engine loop).
    """

    def __init__(self, engine: LLMEngine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._collected: list[RequestOutput] | None = None

    def put(self, out: RequestOutput) -> None:  # the sink, called by the core thread
        collected = self._collected
        if collected is not None and not out.finished:
            collected.append(out)
        else:
            self.queue.put(out)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self.queue.get()
            yield out
            if out.finished:
                return

    def cancel(self) -> None:
        self.engine.abort(self.request_id)

    def result(self) -> RequestOutput:
        """Wait for the end and return the whole output as one ``RequestOutput``."""
        # The core thread is the only producer: the deltas queued before this switch come
        # before those it collects after, and the last delta is always queued, after both.
        self._collected = collected = []
        queued = list(self)
        return merge_deltas(queued[:-1] + collected + queued[-1:])


class LLMEngine:
    """One model replica's engine: submit requests, stream their tokens, cancel, shut down."""

    # Each rank loads a ``TPWorker``; rank 0 then runs this engine over it (``from_worker``).
    uses_rank_workers = True

    def __init__(
        self, core: EngineCore, tokenizer: Tokenizer, config: ModelConfig,
        followers: list[subprocess.Popen] | tuple = (),
    ) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.config = config
        self._followers = list(followers)
        self._closed = False

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, checkpoint_dir: str | Path | None = None) -> LLMEngine:
        """Start every rank of ``config`` on this machine (ranks > 0 as child processes)."""
        path = Path(checkpoint_dir) if checkpoint_dir else resolve_checkpoint(config)
        port = free_port() if config.tp_size > 1 else None
        followers = [
            follower.start(config.model_dump_json(), rank, config.tp_size, port, str(path))
            for rank in range(1, config.tp_size)
        ]
        worker = TPWorker(config, 0, config.tp_size, "127.0.0.1", port, checkpoint_dir=path)
        try:
            worker.load()
        except BaseException:
            for p in followers:
                p.kill()
            raise
        engine = cls.from_worker(worker, config)
        engine._followers = followers
        return engine

    @classmethod
    def load_tokenizer(cls, config: ModelConfig, **_options: Any) -> Tokenizer:
        """The tokenizer of ``config``'s checkpoint, loaded where it is used (the serving
        layer templates and counts prompts with it). Only the checkpoint's small files are
        needed: a store version is not pulled whole for it (the ranks pull the weights)."""
        return load_tokenizer(resolve_checkpoint(config.model_copy(update={"lazy_load": True})))

    @classmethod
    def from_worker(cls, worker: TPWorker, config: ModelConfig) -> LLMEngine:
        """Run the engine core over an already loaded rank-0 worker."""
        tokenizer = load_tokenizer(worker.checkpoint_path)
        core = EngineCore(worker, tokenizer, config).start()
        return cls(core, tokenizer, config)

    # -- requests ---------------------------------------------------------------------------

    def default_params(self, **overrides) -> SamplingParams:
        """Sampling parameters from the model config's defaults, with ``overrides``."""
        c = self.config
        fields = dict(
            max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
            repetition_penalty=c.repetition_penalty, seed=c.seed,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**fields)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        return list(prompt)

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        share_prompt_of: str | None = None,
    ) -> _SyncStream:
        """Start a request; iterate the returned stream for its deltas. ``share_prompt_of``:
        the id of a request with the same prompt whose KV this one copies (n > 1)."""
        rid = request_id or new_request_id()
        stream = _SyncStream(self, rid)
        self.core.add_request(
            rid, self.encode_prompt(prompt), params or self.default_params(), OutputSink(stream.put),
            share_prompt_of,
        )
        return stream

    def generate_text(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestOutput:
        """Blocking convenience: the whole output of one request."""
        return self.submit(prompt, params).result()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        share_prompt_of: str | None = None,
        resumed: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; closing the iterator early cancels the request.
        ``share_prompt_of``: a sibling of that request (n > 1); ``resumed``: the tail of the
        prompt ids that is the request's own earlier output (see ``EngineCore.add_request``)."""
        rid = request_id or new_request_id()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        sink = OutputSink(outputs.put_nowait, asyncio.get_running_loop())
        self.core.add_request(
            rid, self.encode_prompt(prompt), params or self.default_params(), sink, share_prompt_of,
            resumed,
        )
        finished = False
        try:
            while True:
                out = await outputs.get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.core.abort(rid)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self.core.stats()

    def check_health(self) -> None:
        self.core.check_health()
        dead = [
            f"rank {rank} (exit code {p.returncode})"
            for rank, p in enumerate(self._followers, start=1)
            if p.poll() is not None
        ]
        if dead:
            raise EngineDeadError(f"tensor-parallel ranks stopped: {', '.join(dead)}")

    def update_config(self, config: ModelConfig) -> None:
        """Take new sampling defaults (fields that apply live; see ``cluster.config.plan_update``)."""
        self.config = config

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.core.shutdown()
        for p in self._followers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["LLMEngine", "MAIError"]
