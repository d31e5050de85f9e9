"""A fake engine for fast tests of the serving graph: no model, the same interface.

``FakeEngine`` implements ``engine.types.AsyncEngineClient`` like ``LLMEngine`` does: deltas
streamed at a configurable rate, ``max_tokens``, stop strings, cancellation that frees the
slot at once, a bounded queue (``CapacityError``), stats, and a switch that kills it (every
request then fails and ``check_health`` raises ``EngineDeadError``). The text it writes is a
fixed reply (its words shuffled by the seed when sampling), or an echo of the prompt. It
cannot follow a grammar: a request with a JSON ``response_format`` (checked as the real engine
checks it) gets ``{}``, the smallest JSON object.

It tokenizes with the real tiny tokenizer when ``engine.tokenizer`` and the tiny checkpoint
are available, else with ``ByteTokenizer`` (one token per UTF-8 byte).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ModelConfig
from cluster.errors import CapacityError, EngineDeadError
from cluster.logging_setup import get_logger
from engine.decoding.structured import parse_response_format
from engine.types import EngineStats, RequestOutput, SamplingParams, new_request_id

log = get_logger("engine.fake")

DEFAULT_REPLY = (
    "Llamas are social animals that live in herds. They are gentle, curious and easy to "
    "train, and they hum to each other when they are calm."
)


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258), ``<s>``=1, ``</s>``=2, Llama 2's chat format."""

    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - 3 for i in ids if i >= 3)
        return data.decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`` per turn."""
        messages = list(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        ids: list[int] = []
        for i, msg in enumerate(messages):
            if msg["role"] == "user":
                content = msg["content"]
                if system is not None and i == 0:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                ids += self.encode(f"[INST] {content.strip()} [/INST]", add_bos=True)
            else:
                ids += self.encode(f" {msg['content'].strip()} ", add_bos=False) + [
                    self.eos_token_id
                ]
        return ids


def _make_tokenizer(choice: Any) -> Any:
    if choice == "auto":
        return _default_tokenizer()
    if choice == "bytes":
        return ByteTokenizer()
    return choice


def _default_tokenizer() -> Any:
    """The real tiny tokenizer when the engine provides it, else ``ByteTokenizer``."""
    try:
        from engine.tiny.checkpoint import ensure_tiny_checkpoint
        from engine.tokenizer import load_tokenizer
    except ImportError:
        return ByteTokenizer()
    return load_tokenizer(ensure_tiny_checkpoint())


@dataclass
class _Slot:
    """One running request: its cancel signal, so that ``cancel`` frees it at once."""

    request_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


# The import path Serve configs and the CLI name for this engine (``engine_cls``).
FAKE_ENGINE = f"{__name__}:FakeEngine"


class FakeEngine:
    """An ``AsyncEngineClient`` without a model (see the module docstring)."""

    uses_rank_workers = False  # one process, made by ``from_config`` on rank 0

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        tokens_per_s: float = 1000.0,
        first_token_delay_s: float = 0.0,
        reply: str = DEFAULT_REPLY,
        repeat: bool = False,
        tokenizer: Any = "auto",
        die_on: str | None = None,
    ) -> None:
        """``reply="echo"`` answers with the prompt's text; ``repeat`` repeats the reply until
        ``max_tokens`` (long streams); ``die_on`` kills the engine when a prompt contains that
        string (for tests of a dead engine); ``tokenizer``: ``"auto"``, ``"bytes"`` or one."""
        self.config = config or ModelConfig()
        self.tokens_per_s = tokens_per_s
        self.first_token_delay_s = first_token_delay_s
        self.reply = reply
        self.repeat = repeat
        self.die_on = die_on
        self.tokenizer = _make_tokenizer(tokenizer)
        self._running: dict[str, _Slot] = {}
        self._waiting = 0
        self._slot_freed: asyncio.Event | None = None  # made on the running loop
        self._dead: str | None = None
        self._steps = 0
        self._generated = 0
        self.cancelled_requests = 0

    @classmethod
    def from_config(cls, config: ModelConfig, **options: Any) -> FakeEngine:
        return cls(config, **options)

    @classmethod
    def load_tokenizer(cls, config: ModelConfig, **options: Any) -> Any:
        """The tokenizer ``from_config(config, **options)`` would use (for the serving layer)."""
        return _make_tokenizer(options.get("tokenizer", "auto"))

    # -- the AsyncEngineClient interface ------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        share_prompt_of: str | None = None,
        resumed: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the reply's deltas; closing the iterator early cancels the request
        (``share_prompt_of`` and ``resumed`` are accepted for the real engine's interface;
        nothing is shared, and a resumed reply starts over from the prompt)."""
        params = params or SamplingParams()
        rid = request_id or new_request_id()
        prompt_ids = (
            self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        )
        self._raise_if_dead()
        parse_response_format(params.response_format)  # InvalidRequestError, as at a real submit
        if self.die_on is not None and self.die_on in self.tokenizer.decode(prompt_ids):
            self.kill(f"prompt contained {self.die_on!r}")
            self._raise_if_dead()
        slot = await self._admit(rid)
        arrival = time.monotonic()
        first_token_time = None
        out_ids: list[int] = []
        sent = ""
        finish = None
        hold = max((len(s) for s in params.stop), default=1) - 1
        reply_ids = self._reply_ids(prompt_ids, params)
        try:
            delay = self.first_token_delay_s
            while finish is None:
                cancelled = await self._wait(slot, delay)
                delay = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
                if self._dead:
                    finish = "error"
                    yield RequestOutput(
                        rid,
                        finish_reason="error",
                        error=self._dead,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(out_ids),
                    )
                    return
                if cancelled:
                    finish = "abort"
                    yield RequestOutput(
                        rid,
                        finish_reason="abort",
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(out_ids),
                        arrival_time=arrival,
                    )
                    return
                token = reply_ids[len(out_ids)] if len(out_ids) < len(reply_ids) else None
                if token is None:
                    finish, token_ids = "stop", []
                else:
                    out_ids.append(token)
                    token_ids = [token]
                    self._generated += 1
                self._steps += 1
                first_token_time = first_token_time or time.monotonic()
                text = self.tokenizer.decode(out_ids)
                if text.endswith("\ufffd") and finish is None:
                    text = text[:-1]  # a multi-byte character is not complete yet
                cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                elif finish is None and len(out_ids) >= params.max_tokens:
                    finish = "length"
                visible = text if finish else text[: max(len(sent), len(text) - hold)]
                delta, sent = visible[len(sent) :], visible
                yield RequestOutput(
                    rid,
                    token_ids=token_ids,
                    text=delta,
                    finish_reason=finish,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=len(out_ids),
                    arrival_time=arrival,
                    first_token_time=first_token_time,
                )
        finally:
            if finish in (None, "abort"):
                self.cancelled_requests += 1
            self._release(rid)

    async def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is free when this returns."""
        slot = self._running.get(request_id)
        if slot is not None:
            slot.cancelled.set()
            self._release(request_id)

    def stats(self) -> EngineStats:
        n = self.config.max_num_seqs
        return EngineStats(
            running=len(self._running),
            waiting=self._waiting,
            max_num_seqs=n,
            kv_slots_used=len(self._running),
            kv_slots_total=n,
            steps=self._steps,
            generated_tokens=self._generated,
            alive=self._dead is None,
        )

    def check_health(self) -> None:
        self._raise_if_dead()

    # -- test switches and lifecycle ----------------------------------------------------------

    def kill(self, reason: str = "killed") -> None:
        """Make the engine dead: running requests end with an error, new ones are refused."""
        self._dead = f"the fake engine died: {reason}"
        log.warning("fake engine killed", extra={"reason": reason})
        for slot in self._running.values():
            slot.cancelled.set()
        if self._slot_freed is not None:
            self._slot_freed.set()

    def update_config(self, config: ModelConfig) -> None:
        self.config = config

    def shutdown(self) -> None:
        self.kill("shut down")

    # -- internals ----------------------------------------------------------------------------

    def _raise_if_dead(self) -> None:
        if self._dead:
            raise EngineDeadError(self._dead)

    def _reply_ids(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        if params.constrained:
            return self.tokenizer.encode("{}", add_bos=False)
        if self.reply == "echo":
            text = self.tokenizer.decode(prompt_ids)
        else:
            text = self.reply
            if not params.greedy:
                words = text.split(" ")
                random.Random(params.seed).shuffle(words)
                text = " ".join(words)
        ids = self.tokenizer.encode(text, add_bos=False)
        if self.repeat and ids:
            ids = ids * (params.max_tokens // len(ids) + 1)
        return ids

    async def _admit(self, rid: str) -> _Slot:
        limit = self.config.max_num_seqs
        if len(self._running) >= limit:
            if self._waiting >= self.config.max_queued_requests:
                raise CapacityError(
                    f"{self._waiting} requests are waiting (max_queued_requests="
                    f"{self.config.max_queued_requests}); retry shortly",
                    retry_after=1.0,
                )
            if self._slot_freed is None:
                self._slot_freed = asyncio.Event()
            self._waiting += 1
            try:
                while len(self._running) >= limit and not self._dead:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
            finally:
                self._waiting -= 1
            self._raise_if_dead()
        slot = _Slot(rid)
        self._running[rid] = slot
        return slot

    def _release(self, rid: str) -> None:
        if self._running.pop(rid, None) is not None and self._slot_freed is not None:
            self._slot_freed.set()

    @staticmethod
    async def _wait(slot: _Slot, delay: float) -> bool:
        """Sleep ``delay`` seconds; True when the request was cancelled meanwhile."""
        if slot.cancelled.is_set():
            return True
        if delay <= 0:
            await asyncio.sleep(0)
            return slot.cancelled.is_set()
        try:
            await asyncio.wait_for(slot.cancelled.wait(), delay)
            return True
        except asyncio.TimeoutError:
            return False


__all__ = ["FakeEngine", "ByteTokenizer", "DEFAULT_REPLY"]
