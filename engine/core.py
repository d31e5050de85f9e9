"""The engine core: one loop that drives the model step by step (iteration-level batching).

Each step: take new requests and cancellations from the inbox, ask the scheduler which
sequences run (every decoding sequence plus prefill chunks within the token budget), send the
step to every tensor-parallel rank (``TPWorker.execute``), sample, then detokenize, check stop
conditions and hand each request its delta. Requests join and leave at every step boundary.

Threads: the loop owns the scheduler; other threads only put into the inbox
(``add_request``, ``abort``) and read ``stats``. Outputs leave through per-request sinks;
asyncio sinks are delivered in one ``call_soon_threadsafe`` per event loop per step.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from cluster.config import ModelConfig
from cluster.errors import CapacityError, EngineDeadError, InvalidRequestError, MAIError
from cluster.logging_setup import get_logger
from engine.decoding.logits_processing import token_logprobs
from engine.decoding.sampling import Sampler, make_generator
from engine.decoding.stop import StopStringMatcher
from engine.inbox import AbortRequest, AddRequest, InboxItem
from engine.rank.step_messages import StepPlan
from engine.rank.worker import HEARTBEAT_S, TPWorker
from engine.scheduling.scheduler import Scheduler, Sequence
from engine.scheduling.siblings import ParkedSiblings
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.types import (
    EngineStats,
    OutputSink,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    context_length_error,
)

log = get_logger("engine.core")

Sink = OutputSink


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    sink: Sink
    detok: IncrementalDetokenizer
    stop: StopStringMatcher | None
    generator: torch.Generator | None
    arrival: float
    first_token_time: float | None = None
    stopped_by_string: bool = False
    grammar: Any = None  # engine.structured.GrammarState of a constrained request
    logprob: TokenLogprob | None = None  # of the token sampled in this step (logprobs asked)
    resumed: int = 0  # output tokens generated elsewhere before (the tail of the prompt ids)

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt_token_ids) - self.resumed

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output_token_ids) + self.resumed


class EngineCore:
    """Drives one model replica; rank 0 of its tensor-parallel group."""

    def __init__(self, worker: TPWorker, tokenizer: Tokenizer, config: ModelConfig) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            max_model_len=config.context_length,
            max_queued_requests=config.max_queued_requests,
            block_size=config.kv_block_size,
            num_kv_blocks=config.resolved_kv_cache_blocks(),
            enable_prefix_caching=config.enable_prefix_caching,
            watermark=config.kv_watermark,
        )
        self.sampler = Sampler(eos_token_id=tokenizer.eos_token_id)
        # The streaming detokenizer's table of plain pieces: built here, not in the first step.
        tokenizer.prepare_streaming()
        self._requests: dict[str, _Request] = {}
        # Siblings of a request (n > 1) parked until its prompt is prefilled (engine/scheduling/siblings.py)
        self._parked = ParkedSiblings()
        self._inbox: collections.deque[InboxItem] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._dead: str | None = None
        self._pending = 0  # added but not yet taken by the loop (for admission control)
        self._steps = 0
        self._generated = 0
        # Constrained decoding (engine/decoding/structured.py), built on the first request that asks
        # for it; while no running request has a grammar, a step pays nothing for it.
        self._structured: Any = None
        self._structured_lock = threading.Lock()
        self._num_constrained = 0
        self._thread = threading.Thread(target=self._loop, name="m-ai-engine-core", daemon=True)

    def start(self) -> EngineCore:
        self._thread.start()
        return self

    # -- called from any thread -------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        share_prompt_of: str | None = None,
        resumed: int = 0,
    ) -> None:
        """Queue a request; raises at once when it can never run or the queue is full.
        ``share_prompt_of``: the first of ``n`` samples of this prompt, added just before; this
        one copies that prompt's KV once it is computed (``engine/scheduling/siblings.py``).
        ``resumed``: the last ``resumed`` of ``prompt_ids`` are this request's own output from
        a replica that died (``serving.migration``): they are computed as prompt, and the
        detokenizer, the stop strings and the grammar continue after them, so the deltas go on
        exactly where the client's stream stopped; the counts report them as output
        (``params.max_tokens`` is what is left to generate)."""
        if not 0 <= resumed < len(prompt_ids):
            raise InvalidRequestError(
                f"resumed={resumed} must be below the {len(prompt_ids)} prompt ids it is the tail of",
                param="resumed",
            )
        if self._dead:
            raise EngineDeadError(f"the engine stopped: {self._dead}")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        error = context_length_error(len(prompt_ids), params.max_tokens, self.config.context_length)
        if error is not None:  # the serving layer checked already: this is for direct callers
            raise error
        queued = self.scheduler.num_waiting + self._pending
        if queued >= self.config.max_queued_requests + self.config.max_num_seqs - self.scheduler.num_running:
            raise CapacityError(
                f"{queued} requests are waiting (max_queued_requests={self.config.max_queued_requests}); "
                f"retry shortly",
                retry_after=1.0,
            )
        grammar = self.structured_output().compile_params(params) if params.constrained else None
        self._pending += 1
        self._inbox.append(
            AddRequest(request_id, prompt_ids, params, sink, time.monotonic(), grammar, share_prompt_of, resumed)
        )
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot is free from the next step on."""
        self._inbox.append(AbortRequest(request_id))
        self._wake.set()

    def structured_output(self) -> Any:
        """The grammar compiler and masker of this engine's tokenizer (built once)."""
        with self._structured_lock:
            if self._structured is None:
                from engine.decoding.structured import StructuredOutput

                self._structured = StructuredOutput(self.tokenizer, self._model_vocab_size())
            return self._structured

    def _model_vocab_size(self) -> int:
        """The logits width: the model's vocabulary, which may be padded beyond the tokenizer's."""
        return self.worker.vocab_size or self.tokenizer.vocab_size

    def stats(self) -> EngineStats:
        s = self.scheduler
        pool = s.pool
        return EngineStats(
            running=s.num_running,
            waiting=s.num_waiting + self._pending,
            max_num_seqs=self.config.max_num_seqs,
            kv_slots_used=s.num_running,
            kv_slots_total=self.config.max_num_seqs,
            kv_blocks_used=pool.num_in_use,
            kv_blocks_total=pool.num_blocks,
            prefix_cache_hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            prefix_cache_hit_tokens=s.prefix_hits,
            prefix_cache_queries=s.prefix_queries,
            num_preemptions=s.num_preemptions,
            steps=self._steps,
            generated_tokens=self._generated,
            alive=self._dead is None and self.worker.alive,
        )

    def check_health(self) -> None:
        if self._dead:
            raise EngineDeadError(f"the engine stopped: {self._dead}")
        if not self._thread.is_alive() and not self._stopping:
            raise EngineDeadError("the engine loop is not running")

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.worker.shutdown()

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.scheduler.has_work:
                    if not self._wake.wait(HEARTBEAT_S):
                        self.worker.heartbeat()
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # noqa: BLE001 - every request must hear about it
            self._dead = f"{type(exc).__name__}: {exc}"
            log.error("engine loop died; failing every request", exc_info=True)
            self._fail_all(self._dead)
        else:
            self._fail_all("the engine is shutting down", reason="abort")

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, AddRequest):
                leader = item.share_prompt_of
                if leader is not None and self._prefilling(leader, item.prompt_ids):
                    self._parked.park(leader, item)
                    continue
                self._admit_item(item)
            else:
                self._cancel(item.request_id)

    def _admit_item(self, item: AddRequest) -> None:
        self._pending -= 1
        self._admit(item.request_id, item.prompt_ids, item.params, item.sink, item.arrival, item.grammar, item.resumed)

    def _prefilling(self, leader: str, prompt_ids: list[int]) -> bool:
        """Whether ``leader`` runs and still computes the same prompt (siblings wait for it)."""
        req = self._requests.get(leader)
        seq = req.seq if req is not None else None
        return (
            self.scheduler.pool.enable_caching and seq is not None and seq.is_prefilling
            and seq.prompt_token_ids == prompt_ids
        )

    def _release_parked(self, leader: str) -> None:
        """Admit ``leader``'s parked siblings: its prompt's full blocks are in the prefix cache
        now (the scheduler registered them), so their admission shares those blocks."""
        for item in self._parked.take(leader):
            self._admit_item(item)

    def _admit(self, rid, prompt_ids, params, sink, arrival, grammar=None, resumed=0) -> None:
        seq = Sequence(request_id=rid, prompt_token_ids=list(prompt_ids), max_tokens=params.max_tokens)
        skip = params.skip_special_tokens
        try:
            self.scheduler.add(seq)
        except MAIError as exc:
            failed = RequestOutput(rid, finish_reason="error", error=exc.message, prompt_tokens=len(prompt_ids) - resumed)
            _call_sink(sink, failed)
            return
        req = self._requests[rid] = _Request(
            seq=seq,
            params=params,
            sink=sink,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=skip),
            stop=StopStringMatcher(params.stop) if params.stop else None,
            generator=make_generator(params.seed) if params.seed is not None else None,
            arrival=arrival,
            grammar=self._structured.new_state(grammar) if grammar is not None else None,
            resumed=resumed,
        )
        if grammar is not None:
            self._num_constrained += 1
        for token in prompt_ids[len(prompt_ids) - resumed:] if resumed else ():
            # replay what the client has: the text it was sent (or that is held back) is the same
            text = req.detok.add(token)
            if req.stop is not None:
                req.stop.feed(text)
            if req.grammar is not None:
                req.grammar.accept(token)

    def _cancel(self, rid: str) -> None:
        parked = self._parked.remove(rid)
        if parked is not None:
            self._pending -= 1
            _call_sink(parked.sink, RequestOutput(rid, finish_reason="abort", prompt_tokens=len(parked.prompt_ids)))
            return
        req = self._requests.pop(rid, None)
        if rid in self._parked:  # the leader went away before its prompt was computed
            self._release_parked(rid)
        self.scheduler.abort(rid)
        if req is not None:
            self._forget_grammar(req)
            _call_sink(req.sink, self._final(req, "abort"))

    def _forget_grammar(self, req: _Request) -> None:
        if req.grammar is not None:
            self._num_constrained -= 1

    def _step(self) -> None:
        out = self.scheduler.schedule()
        if out.is_empty:
            return
        plan = StepPlan(
            decode_tokens=[s.last_token_id for s in out.decode],
            decode_positions=[s.num_tokens - 1 for s in out.decode],
            decode_tables=[s.block_table for s in out.decode],
            prefill=[(c.token_ids, c.start, c.seq.block_table) for c in out.prefill],
        )
        logits = self.worker.execute(plan)
        self._steps += 1
        # rows that produce a token: every decode row, and prefill chunks that end a prompt
        rows = list(range(len(out.decode)))
        seqs = list(out.decode)
        base = len(out.decode)
        for j, chunk in enumerate(out.prefill):
            if chunk.completes_prompt:
                rows.append(base + j)
                seqs.append(chunk.seq)
        if not seqs:
            self.scheduler.update(out, {})
            return
        reqs = [self._requests[s.request_id] for s in seqs]
        params = [r.params for r in reqs]
        needs_history = any(p.repetition_penalty != 1.0 for p in params)
        selected = logits if len(rows) == logits.shape[0] else logits[rows]
        logprob_rows = [j for j, p in enumerate(params) if p.logprobs is not None]
        raw = selected[logprob_rows].float() if logprob_rows else None  # before any mask
        grammars = [r.grammar for r in reqs] if self._num_constrained else None
        if grammars is not None:
            self._structured.apply_masks(selected, grammars)  # in place, grammar rows only
        tokens = self.sampler.sample(
            selected.float(),
            params,
            [r.generator for r in reqs],
            [s.all_token_ids for s in seqs] if needs_history else None,
            [s.output_token_ids for s in seqs] if any(p.processes_logits for p in params) else None,
        ).tolist()
        if raw is not None:
            found = token_logprobs(
                raw, [tokens[j] for j in logprob_rows], [params[j].logprobs for j in logprob_rows]
            )
            for j, lp in zip(logprob_rows, found):
                reqs[j].logprob = lp
        if grammars is not None:
            self._structured.accept(grammars, tokens)
        self.scheduler.update(out, {s.request_id: t for s, t in zip(seqs, tokens)})
        self._generated += len(tokens)
        if self._parked:  # siblings of sequences whose prompt this step completed
            for s in seqs:
                if s.request_id in self._parked and len(s.output_token_ids) <= 1:
                    self._release_parked(s.request_id)
        self._emit(reqs, tokens)

    def _emit(self, reqs: list[_Request], tokens: list[int]) -> None:
        now = time.monotonic()
        eos = self.tokenizer.eos_token_id
        deliveries: dict = {}
        for req, token in zip(reqs, tokens):
            seq, p = req.seq, req.params
            if req.first_token_time is None:
                req.first_token_time = now
            finish = None
            drop_token = False  # a stop token (eos, stop_token_ids, grammar end) is not output
            grammar = req.grammar
            if (token == eos and not p.ignore_eos) or token in p.stop_token_ids or (
                grammar is not None and grammar.terminated  # the JSON is complete
            ):
                finish = "stop"
                text = ""
                drop_token = True
            elif grammar is not None and grammar.rejected is not None:
                finish = "error"  # the mask allowed a token the grammar refuses: a bug
                text = ""
                drop_token = True
                log.error("grammar refused a sampled token", extra={"request_id": seq.request_id, "token": token})
            else:
                text = req.detok.add(token)
                if req.stop is not None:
                    text, hit = req.stop.feed(text)
                    if hit:
                        finish = "stop"
                        req.stopped_by_string = True
                        if p.include_stop_str_in_output:
                            text += req.stop.matched or ""
            logprobs = [req.logprob] if req.logprob is not None and not drop_token else None
            if p.logprobs is not None and logprobs is None:
                logprobs = []
            if finish is None and (seq.is_finished or len(seq.output_token_ids) >= p.max_tokens):
                finish = "length"
            if finish is None and seq.num_tokens >= self.config.context_length:
                finish = "length"
            if finish == "length" and grammar is not None and grammar.completed:
                finish = "stop"  # cut exactly where the document is complete: nothing is missing
            if finish is None:
                out = RequestOutput(
                    seq.request_id,
                    token_ids=[token],
                    text=text,
                    prompt_tokens=req.prompt_tokens,
                    completion_tokens=req.completion_tokens,
                    arrival_time=req.arrival,
                    first_token_time=req.first_token_time,
                    logprobs=logprobs,
                )
            else:
                if not seq.is_finished:
                    self.scheduler.finish(seq.request_id, finish)
                self._requests.pop(seq.request_id, None)
                self._forget_grammar(req)
                out = self._final(req, finish, token_ids=[] if drop_token else [token], text=text)
                out.logprobs = logprobs
                if finish == "error":
                    out.error = f"the grammar of response_format refused token {token}"
            _deliver_later(deliveries, req.sink, out)
        _flush(deliveries)

    def _final(self, req: _Request, reason: str, token_ids=None, text: str = "") -> RequestOutput:
        if not req.stopped_by_string and reason != "error":
            # release what was held back: an unfinished character, a possible stop prefix
            tail = req.detok.flush()
            if req.stop is not None:
                tail, hit = req.stop.feed(tail)
                tail = tail if hit else tail + req.stop.flush()
            text += tail
        return RequestOutput(
            req.seq.request_id,
            token_ids=token_ids or [],
            text=text,
            finish_reason=reason,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.completion_tokens,
            arrival_time=req.arrival,
            first_token_time=req.first_token_time,
        )

    def _fail_all(self, error: str, reason: str = "error") -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, AddRequest):
                self._pending -= 1
                _call_sink(item.sink, RequestOutput(item.request_id, finish_reason=reason, error=error))
        for parked in self._parked.drain():
            self._pending -= 1
            _call_sink(parked.sink, RequestOutput(parked.request_id, finish_reason=reason, error=error))
        for rid, req in list(self._requests.items()):
            out = self._final(req, reason) if reason == "abort" else RequestOutput(
                rid, finish_reason="error", error=error,
                prompt_tokens=req.prompt_tokens, completion_tokens=req.completion_tokens,
            )
            _call_sink(req.sink, out)
            self.scheduler.abort(rid)
        self._requests.clear()
        self._num_constrained = 0


def _call_sink(sink: Sink, out: RequestOutput) -> None:
    """Hand ``out`` over now. A consumer that fails must never take the engine down with it."""
    if sink.loop is not None:
        try:
            sink.loop.call_soon_threadsafe(sink.put, out)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass
        return
    try:
        sink.put(out)
    except Exception:
        log.warning("dropping output for a failed consumer", extra={"request_id": out.request_id}, exc_info=True)


def _deliver_later(deliveries: dict, sink: Sink, out: RequestOutput) -> None:
    if sink.loop is None:
        _call_sink(sink, out)
    else:
        deliveries.setdefault(sink.loop, []).append((sink, out))


def _flush(deliveries: dict) -> None:
    for loop, items in deliveries.items():
        try:
            loop.call_soon_threadsafe(_run_sinks, items)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


def _run_sinks(items) -> None:
    for sink, out in items:
        sink.put(out)
