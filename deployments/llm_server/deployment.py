"""One replica of one model: its rank actors, its request path, its live configuration.

A plain class (``serve.deployment`` is applied in ``app.py``) that takes the engine class as a
parameter. On start it creates the replica's tensor-parallel ``RankActor``s in the placement
group Serve reserved with the replica (``actors.tp.rank_group``), waits until they have loaded,
and loads the tokenizer of the engine's checkpoint. Each request (one ``ModelRequest``) is
templated and its context length checked here, then handed to rank 0 as one stream per choice
(over rank 0's local socket, ``rank_requests.py``); rank 0's engine core batches it with the others, and the engine's typed deltas
stream back to the ingress (``deployments.messages``).

Live configuration arrives as Serve's ``user_config`` (``reconfigure``, schema
``cluster.config.serving.LiveConfig``): sampling defaults and stream pacing change at once; a
change that needs the weights reloaded is refused with a message that says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from actors.memory.recall.context import ContextAssembler
from actors.tp.rank import resolve_engine_cls
from actors.tp.rank_group import RankGroup
from cluster.autoscaling.latency_window import LatencyWindow
from cluster.autoscaling.policy import QUEUE_KEY, TTFT_KEY
from cluster.config import LIVE_FIELDS, ModelConfig, plan_update
from cluster.config.memory import MemoryConfig
from cluster.config.serving import LiveConfig, ServingConfig, replica_bundles
from cluster.errors import ConfigError, EngineDeadError, InvalidRequestError
from cluster.logging_setup import get_logger
from deployments.errors import as_mai_error
from deployments.ingress.openai_api import inputs as oa
from deployments.ingress.openai_api.outputs import TokenTexts
from deployments.ingress.openai_api.tool_calls import llama_messages
from deployments.live_config_status import publish_refusal
from deployments.llm_server.metrics import MetricsRecorder
from deployments.llm_server.monitor import ReplicaMonitor
from deployments.llm_server.rank_recovery import RankRecovery
from deployments.llm_server.rank_requests import RankRequests, interleave
from deployments.llm_server.request_metrics import RequestTrace
from deployments.messages import ChoiceDelta, ModelRequest
from deployments.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from deployments.serve_logging import quiet_client_errors
from engine.stream_batching import StreamPacing
from engine.types import RequestOutput, SamplingParams, output_failure

log = get_logger("deployments.llm_server.deployment")


def _replica_label() -> str:
    """A name unique to this replica (Serve's replica id), for its rank actors."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        label = f"{ctx.app_name}-{ctx.deployment}-{ctx.replica_id.unique_id}"
    except Exception:  # not inside a Serve replica (a plain Ray test)
        label = uuid.uuid4().hex[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", label)


def _app_and_deployment() -> tuple[str, str]:
    """This replica's application and deployment names (placeholders outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment
    except Exception:
        return "", ""


class LLMServer:
    """Serves one model (see the module docstring)."""

    async def __init__(
        self,
        model_config: ModelConfig,
        serving: ServingConfig | None = None,
        engine_cls: str | type | None = None,
        engine_options: dict[str, Any] | None = None,
        memory: MemoryConfig | None = None,
    ) -> None:
        # A client's 4xx reaches the ingress, which logs it: here it makes no log line at all.
        quiet_client_errors(logging.DEBUG)
        self.base_config = model_config
        self.config = model_config
        self.serving = serving or ServingConfig()
        self.name = model_config.served_name
        self.refused: str | None = None  # why the last live update was refused
        publish_refusal(*_app_and_deployment(), None)  # a new replica has refused nothing yet
        self.pacing = StreamPacing(
            self.serving.stream_interval_ms / 1000, self.serving.stream_max_events_per_s
        )
        rank_bundle = replica_bundles(self.serving, model_config)[1]
        group_options = {
            "name_prefix": f"m-ai-rank-{_replica_label()}",
            "engine_cls": engine_cls,
            "engine_options": engine_options,
            "num_cpus": rank_bundle["CPU"],
            "num_gpus": rank_bundle.get("GPU", 0.0),
            "niceness": self.serving.rank_niceness,
        }
        started = time.monotonic()
        group = RankGroup.start(model_config, **group_options)
        await group.wait_loaded(self.serving.rank_start_timeout_s)  # ends the group if it fails
        # The rank group, watched and rebuilt at once when a rank dies (rank_recovery.py).
        self.recovery = RankRecovery(
            group, group_options, time.monotonic() - started,
            name=self.name, start_timeout_s=self.serving.rank_start_timeout_s,
            config=lambda: self.config, on_stop=self._on_group_stop, on_start=self._on_group_start,
        )
        # Requests to rank 0 over its local socket once open, Ray calls until then.
        self.rank_requests = RankRequests(self.serving.rank_channel)
        await self.rank_requests.attach(group)
        # Loaded here, where prompts are templated and counted (the ranks have it cached).
        self.tokenizer = await asyncio.to_thread(
            resolve_engine_cls(engine_cls).load_tokenizer, model_config, **(engine_options or {})
        )
        self.token_texts = TokenTexts(self.tokenizer)  # logprobs' token strings
        # Prompts of session requests with a memory recall (actors.memory_context).
        self.assembler = ContextAssembler(self.tokenizer, (memory or MemoryConfig()).context)
        # Metrics and the latency the autoscaling policy reads (record_autoscaling_stats).
        self.latency = LatencyWindow(self.serving.autoscaling.look_back_period_s)
        self.recorder = MetricsRecorder(model=self.name, replica=_replica_label().rsplit("-", 1)[-1])
        self._start_monitor()
        log.info("model replica ready", extra={"model": self.name, "tp_size": model_config.tp_size})

    @property
    def ranks(self) -> RankGroup:
        """The rank group that serves now (a new one after a rebuild)."""
        return self.recovery.group

    def _on_group_start(self) -> None:
        """A rebuilt rank group serves: watch it, and open its rank 0's request channel."""
        self._start_monitor()
        asyncio.ensure_future(self.rank_requests.attach(self.ranks))

    def _on_group_stop(self) -> None:
        self._stop_monitor()
        self.rank_requests.detach()

    def _start_monitor(self) -> None:
        self.monitor = ReplicaMonitor(
            self.recorder, self.ranks, self.config, self.serving.metrics_interval_s, self.latency
        ).start()

    def _stop_monitor(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.stop()

    # -- live configuration -------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply Serve's ``user_config`` (a ``LiveConfig``) without restarting the replica.

        A change that is invalid or needs a reload is refused: the replica keeps serving with
        its current configuration, logs the reason and reports it in ``live_config()`` and
        ``health()``. (Raising here would make Serve stop the replica: a typo in a live update
        must not take the model down.)
        """
        try:
            live = LiveConfig.model_validate(user_config or {})
            update = plan_update(self.base_config, live.model)
            if update.needs_reload:
                changes = ", ".join(
                    f"{k} {getattr(self.base_config, k)!r} -> {getattr(update.config, k)!r}"
                    for k in update.reload
                )
                raise ConfigError(
                    f"user_config changes {changes} of {self.name}, which needs the weights "
                    f"reloaded: change it in the application's config and redeploy (new replicas "
                    f"load it); user_config applies only {', '.join(sorted(LIVE_FIELDS))} and stream pacing",
                    param=f"user_config.model.{update.reload[0]}",
                )
        except (ConfigError, ValidationError) as exc:
            self.refused = (
                exc.message if isinstance(exc, ConfigError) else f"user_config is invalid: {exc}"
            )
            log.error(f"live configuration refused; the replica keeps its current one: {self.refused}",
                      extra={"model": self.name})
            publish_refusal(*_app_and_deployment(), self.refused)
            return
        if self.refused is not None:
            publish_refusal(*_app_and_deployment(), None)
        self.refused = None
        self.pacing = StreamPacing(
            (
                live.stream_interval_ms
                if live.stream_interval_ms is not None
                else self.serving.stream_interval_ms
            )
            / 1000,
            live.stream_max_events_per_s or self.serving.stream_max_events_per_s,
        )
        if update.config != self.config:
            await self.ranks.rank0.update_config.remote(update.config)
            self.config = update.config
        log.info(
            "live configuration applied",
            extra={"model": self.name, "changed": ",".join(update.live)},
        )

    def live_config(self) -> dict[str, Any]:
        """The configuration in effect now (sampling defaults and pacing)."""
        return {
            "model": {k: getattr(self.config, k) for k in sorted(LIVE_FIELDS)},
            "stream_interval_ms": self.pacing.min_interval_s * 1000,
            "stream_max_events_per_s": self.pacing.max_events_per_s,
            "refused": self.refused,
        }

    # -- requests -----------------------------------------------------------------------------

    async def generate(self, request: ModelRequest) -> AsyncIterator[ChoiceDelta]:
        """Stream the engine's deltas of one request (``deployments.messages``), each choice's
        (``n``) as they come: paced while it runs when ``request.stream``, else one merged
        output per choice at its end. The ingress shapes them into OpenAI objects. Closing
        this stream cancels the request in the engine (the one cancellation path).

        A resumption (``request.resume``, after the replica that streamed it died) generates
        only the choices listed, each from its prompt plus the tokens its client has, and
        streams what follows them (``resume_choices``)."""
        prompt, params, echo = self._prepare(request)
        choices = resume_choices(prompt.token_ids, params, request.resume)
        pacing = self.pacing if request.stream else None
        texts = self.token_texts
        unechoed = {c.index for c in choices if not c.resumed} if echo else set()
        async for index, out in self._choice_streams(request, choices, pacing):
            table = texts.table(out.logprobs) if out.logprobs else None
            yield ChoiceDelta(index, out, table, echo if index in unechoed else "")
            unechoed.discard(index)

    async def preview(self, request: ModelRequest) -> dict[str, Any]:
        """What ``generate`` would give the engine for ``request``, generating nothing: the
        messages the chat template renders and their token count (``POST
        /v1/sessions/{id}/context``). One path with ``generate``, so the same 400s answer."""
        prompt = self._prepare(request)[0]
        return {"messages": prompt.messages, "prompt_tokens": len(prompt.token_ids),
                "dropped_turns": prompt.dropped_turns}

    def _prepare(self, request: ModelRequest) -> tuple[oa.Prompt, list[SamplingParams], str]:
        """The prompt, each choice's sampling and the echo of ``request``; the context length
        is checked here, where the tokenizer is (a 400 in vLLM's words)."""
        body, context = request.body, request.context
        if isinstance(body, ChatCompletionRequest):
            if context.recall is not None:
                prompt = self._memory_prompt(body, context.recall, context.system_prompt)
            else:
                prompt = oa.chat_prompt(self.tokenizer, body, self.config, context.history_len)
            params = oa.sampling_params(body, self.config, len(prompt.token_ids), "messages")
            echo = ""
        else:
            prompt = oa.completion_prompt(self.tokenizer, body)
            params = oa.sampling_params(body, self.config, len(prompt.token_ids), "prompt")
            echo = self._echo(body, prompt)
        return prompt, _choices(params, body.n), echo

    def _echo(self, request: CompletionRequest, prompt: oa.Prompt) -> str:
        if not request.echo:
            return ""
        if isinstance(request.prompt, str):
            return request.prompt
        return self.tokenizer.decode(prompt.token_ids)

    def _memory_prompt(
        self, request: ChatCompletionRequest, recall: Any, system_prompt: str | None
    ) -> oa.Prompt:
        """The prompt assembled from memory within ``context_length - max_tokens``; should the
        assembly itself fail, the recall's turns go through the sliding window instead."""
        want = request.max_tokens or min(self.config.max_tokens, self.config.context_length // 2)
        messages: list[Any] = list(request.messages)
        if request.tools or any(m.role in ("developer", "tool") or m.tool_calls for m in messages):
            # Tools and tool turns as Llama 2 turns; the tools prompt joins the system prompt.
            messages = llama_messages(request)
            own_system = any(m.role in ("system", "developer") for m in request.messages)
            if system_prompt and not own_system and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": f"{system_prompt}\n\n{messages[0]['content']}"}
        try:
            context = self.assembler.assemble(
                messages, context_length=self.config.context_length, max_tokens=want,
                recall=recall, system_prompt=system_prompt,
            )
            return oa.Prompt(context.token_ids, context.dropped_turns, context.messages)
        except InvalidRequestError:
            raise
        except Exception as exc:
            log.warning("memory context assembly failed; using the sliding window",
                        extra={"model": self.name, "error": repr(exc)[:300]})
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        history = head + [m for turn in recall.turns for m in turn]
        messages = [ChatMessage.model_validate(m) for m in history] + list(request.messages)
        return oa.chat_prompt(
            self.tokenizer, request.model_copy(update={"messages": messages}), self.config, len(history)
        )

    async def _choice_streams(
        self, request: ModelRequest, choices: list[Choice], pacing: StreamPacing | None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(choice index, delta)`` of the choices of one request, as they come. Choices after
        the first of a fresh request are its siblings in the engine: they wait for its prompt's
        KV and copy it instead of computing it again (``EngineCore.add_request``)."""
        if len(choices) == 1:
            async for out in self._engine_stream(request, choices[0], pacing):
                yield choices[0].index, out
            return
        streams = {c.index: self._engine_stream(request, c, pacing) for c in choices}
        async for index, out in interleave(streams):
            yield index, out

    async def _engine_stream(
        self, request: ModelRequest, choice: Choice, pacing: StreamPacing | None
    ) -> AsyncIterator[RequestOutput]:
        """Choice ``index`` of ``request``: one stream from rank 0 (``rank_requests.py``).
        Cancellation has one path: closing this stream closes rank 0's, which closes the
        engine's (and frees the slot). The request's metrics are recorded after the caller
        took the last output."""
        index, params = choice.index, choice.params
        timing = RequestTrace(self.recorder, self.latency, request.choice_id(index), request.sent_at)
        down = self.recovery.unavailable()
        if down is not None:  # the ranks are being rebuilt: say so at once
            timing.fail(down)
            raise down
        extra: dict[str, Any] = {"resumed": choice.resumed} if choice.resumed else {}
        if index and request.resume is None:
            extra["share_prompt_of"] = request.choice_id(0)
        rid = timing.request_id
        stream = self.rank_requests.stream(self.ranks, rid, choice.prompt_ids, params, rid, pacing, **extra)
        finished = False
        text: list[str] = []
        try:
            while True:
                try:
                    out: RequestOutput = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    # a rank that died names itself
                    error = self.recovery.unavailable() or as_mai_error(exc)
                    timing.fail(error)
                    raise error from None
                timing.on_output(out)
                text.append(out.text)
                finished = out.finished
                yield out
                if finished:
                    failure = output_failure(out)
                    if failure is not None:
                        timing.fail(failure)
                    elif choice.resumed:  # this replica's part: its tokens; JSON is judged whole only
                        here = dataclasses.replace(out, completion_tokens=out.completion_tokens - choice.resumed)
                        timing.finish(here, "".join(text), None)
                    else:
                        timing.finish(out, "".join(text), params.response_format)
                    return
            timing.fail(EngineDeadError("no final output"))
            raise EngineDeadError("the engine ended the stream without a final output")
        finally:
            if not finished:
                await stream.aclose()  # cancels the request on rank 0
                timing.cancelled()

    # -- state ------------------------------------------------------------------------------

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's controller hands the latency autoscaling policy (cluster/autoscaling/policy.py):
        this replica's p90 TTFT (or its oldest waiting request's age) and queue time."""
        report = self.latency.report()
        return {TTFT_KEY: report["ttft"], QUEUE_KEY: report["queue"]}

    async def check_health(self) -> None:
        """Serve's health check: a dead engine or rank raises, and Serve replaces the replica;
        not while the replica rebuilds its ranks itself (rank_recovery.py), unless that failed."""
        if self.recovery.check():
            return
        await self.ranks.check_health(timeout_s=min(10.0, self.serving.health_check_timeout_s))

    async def health(self) -> dict[str, Any]:
        """The engine's stats (and a refused live update), or ``EngineDeadError``. A handle call:
        it waits in the replica's request queue (GET /health asks the Serve controller instead)."""
        await self.check_health()
        report = await self.stats()
        if self.refused:
            report["live_config_refused"] = self.refused
        return report

    async def stats(self) -> dict[str, Any]:
        try:
            stats = await self.ranks.rank0.stats.remote()
        except Exception as exc:
            raise as_mai_error(exc) from None
        return asdict(stats)

    async def describe(self) -> dict[str, Any]:
        """This replica's ranks (actor names, rank order, and their namespace) and its
        placement group, for operators and tests."""
        import ray
        from ray.util.placement_group import get_current_placement_group

        pg = get_current_placement_group()
        table = ray.util.placement_group_table(pg) if pg is not None else {}
        return {
            "model": self.name,
            "rank_names": list(self.ranks.names),
            "namespace": ray.get_runtime_context().namespace,
            "ranks": [await a.describe.remote() for a in self.ranks.actors],
            # how requests reach rank 0 now (serving.rank_channel; "ray" until its socket is open)
            "rank_channel": "socket" if self.rank_requests.serves(self.ranks) else "ray",
            "placement_group": {
                "id": pg.id.hex() if pg else None,
                "strategy": table.get("strategy"),
                "bundles": list(pg.bundle_specs) if pg else [],
            },
        }

    def __del__(self) -> None:
        """Serve calls it when the replica stops, after the drain (``serving.
        graceful_shutdown_timeout_s``): what still runs ends with a typed 503 saying so."""
        grace = getattr(getattr(self, "serving", None), "graceful_shutdown_timeout_s", 0)
        self._stop_monitor()
        rank_requests = getattr(self, "rank_requests", None)
        if rank_requests is not None:
            rank_requests.detach()
        recovery = getattr(self, "recovery", None)  # None when the start failed before it
        if recovery is not None:
            recovery.stop(
                f"model {getattr(self, 'name', '?')}: the replica stopped (scale-down, redeploy or "
                f"shutdown) before this request finished (drain serving.graceful_shutdown_timeout_s="
                f"{grace:g}); retry"
            )


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the engine runs for choice ``index``: its prompt ids (with ``resumed`` output ids
    at their end when it resumes) and its sampling (``max_tokens`` what is left)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    resumed: int = 0


def resume_choices(
    prompt_ids: list[int], params: list[SamplingParams], resume: dict[int, list[int]] | None
) -> list[Choice]:
    """Every choice of a fresh request; of a resumption (``ModelRequest.resume``) the choices
    listed, each continuing after the output ids its client has: they are appended to the
    prompt and count against ``max_tokens`` and ``min_tokens`` (the engine replays their
    text, stop strings and grammar; ``EngineCore.add_request``). Greedy decoding continues
    exactly as if uninterrupted; a seeded one does not (the generator starts afresh), and
    presence/frequency penalties see only the new output."""
    if resume is None:
        return [Choice(i, prompt_ids, p) for i, p in enumerate(params)]
    choices = []
    for index, sent in sorted(resume.items()):
        if not 0 <= index < len(params):
            raise InvalidRequestError(f"resume names choice {index} of a request with n={len(params)}")
        p = params[index]
        if len(sent) >= p.max_tokens:
            raise InvalidRequestError(
                f"resume of choice {index} holds {len(sent)} tokens, max_tokens={p.max_tokens}: "
                f"it has finished, and is not resumed"
            )
        left = dataclasses.replace(p, max_tokens=p.max_tokens - len(sent), min_tokens=max(0, p.min_tokens - len(sent)))
        choices.append(Choice(index, prompt_ids + list(sent), left, len(sent)))
    return choices


def _choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling of each of ``n`` choices: a seeded request's choice i uses seed + i, so
    the choices differ and the whole answer is still reproducible."""
    if n == 1:
        return [params]
    return [
        params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
        for i in range(n)
    ]


__all__ = ["Choice", "LLMServer", "resume_choices"]
