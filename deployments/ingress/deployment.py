"""The front door: the OpenAI-compatible HTTP API and the Python handle API, in one class.

A plain class (``app.py`` applies ``serve.deployment`` and ``serve.ingress``). Its methods
are the handle API and the HTTP routes (``deployments/routes_*.py``) only call them:

    handle = serve.get_app_handle("m-ai")
    reply = await handle.chat.remote(ChatCompletionRequest(model="m-ai-tiny", messages=[...]))
    async for chunk in handle.options(stream=True).chat_stream.remote(request):
        print(chunk.choices[0].delta.content or "", end="")

It routes each request to the model's LLMServer deployment, and with a ``session_id`` gives
it the session's context (the user's memory recall when memory is on, else the session's
earlier turns; ``deployments.ingress.stores.memory``) and stores the finished turn afterwards, then
hands it to memory in the background (a turn that fails or is cancelled is not stored).
Answers pass through the output pipeline (``deployments.ingress.output_processing``: sanitizing, the
tenant's content safety, formats) before the client, and a session, sees them. Every failure
leaves as a ``cluster.errors.MAIError`` (``deployments.errors.as_mai_error``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from actors.tp.supervision import posted_failures, remaining_s
from cluster.config.memory import MemoryConfig
from cluster.config.output import OutputConfig
from cluster.config.serving import ServingConfig
from cluster.errors import EngineDeadError, ModelNotFoundError
from cluster.logging_setup import get_logger
from deployments.errors import as_mai_error, brief
from deployments.ingress.auth import DEFAULT_TENANT, ApiKeyAuth
from deployments.ingress.embeddings import EmbeddingService
from deployments.ingress.migration import StreamMigration
from deployments.ingress.observability import IngressObservability
from deployments.ingress.output_processing import ProcessedStream, ResponseProcessor
from deployments.ingress.stores.memory import IngressMemory
from deployments.ingress.stores.memory_client import MemoryClient
from deployments.ingress.stores.sessions import SessionClient
from deployments.live_config_status import read_refusal
from deployments.messages import ChoiceDelta, ModelRequest, SessionContext
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    MemoryCreateRequest,
    MemorySearchRequest,
    MemoryTurnRequest,
    ModelCard,
    ModelList,
    SessionContextPreview,
    SessionCreateRequest,
    SessionDeleted,
    SessionInfo,
    SessionList,
    SessionTurnRequest,
    parse_request,
)
from deployments.protocol_responses import (
    ConversationCreateRequest,
    ConversationItemsRequest,
    EmbeddingRequest,
    ResponseCreateRequest,
)
from deployments.responses.api import ResponsesApi
from deployments.responses.store import ResponseStore
from deployments.serve_logging import quiet_client_errors

log = get_logger("deployments.ingress.deployment")

# Deployment states in which a model cannot serve (Serve's DeploymentStatus values).
UNHEALTHY = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})
STATUS_CACHE_S = 0.5  # GET /health asks the Serve controller at most this often per replica


def _parse(model: type, value: Any) -> Any:
    try:
        return parse_request(model, value)
    except Exception as exc:
        raise as_mai_error(exc) from None


def _routed(handle: Any, session_id: str | None) -> Any:
    """A session's requests name it, so the model deployment's router (``serving.session_affinity``)
    sends them to the replica whose prefix cache holds the session's earlier turns."""
    return handle.options(session_id=session_id) if session_id else handle


class Ingress:
    """Routes requests to the models, keeps sessions and their memory (see the module docstring,
    ``deployments.ingress.stores.memory`` and ``deployments.responses.api``)."""

    def __init__(
        self,
        models: dict[str, Any],
        cards: list[dict[str, Any]],
        serving: ServingConfig,
        output: OutputConfig | None = None,
        memory: MemoryConfig | None = None,
    ) -> None:
        quiet_client_errors()  # a client's 4xx: one log line, no traceback
        # Calls to the models go replica to replica over Serve's gRPC channel instead of Ray
        # actor calls (`_by_reference=False`): about a fifth less CPU per streamed token here and
        # in the LLMServer (benchmarks/serving_overhead.py, docs/deployment.md).
        self.models = {name: h.options(_by_reference=False) for name, h in models.items()}
        self._streaming = {name: h.options(stream=True) for name, h in self.models.items()}
        self.cards = [ModelCard.model_validate(c) for c in cards]
        self.serving = serving
        self.auth = ApiKeyAuth(serving)
        self.sessions = SessionClient(serving.session_store_shards)
        # POST /v1/embeddings: the memory's embedder under its own model name.
        self.embedder = EmbeddingService(memory)
        self._status_cache: tuple[float, Any] | None = None
        # Loads the output plugins: a broken one fails the start here, not each request.
        self.output = ResponseProcessor(output)
        # Timing breakdown, error and session figures, the response cache, /v1/diagnostics.
        self.observe = IngressObservability(serving.response_cache)
        # A stream whose model replica dies goes on on another one (serving.migration).
        self.migration = StreamMigration(serving.migration, self.observe.migration)
        # Memory shards (deployment actors memory-0..M-1); no client when memory is off.
        client = MemoryClient(memory.shards) if memory is not None and memory.enabled else None
        self.memory = IngressMemory(self.sessions, self.observe, client)
        # /v1/responses and /v1/conversations: on the session store, through the chat path.
        self.responses = ResponsesApi(
            store=ResponseStore(self.sessions), memory=self.memory, chat=self.chat,
            chat_stream=self.chat_stream, delete_session=self.delete_session, check_model=self._model,
        )
        if not self.auth.enabled:
            log.warning(
                "authentication is off: serving.api_keys is empty, every caller is tenant "
                f"{DEFAULT_TENANT!r}; configure key hashes (m-ai config hash-key) to turn it on"
            )

    def __serve_build_asgi_app__(self) -> Any:
        from deployments.http.app import create_http_app

        return create_http_app(self)

    # -- completions --------------------------------------------------------------------------

    async def chat(
        self,
        request: ChatCompletionRequest | dict,
        tenant: str = DEFAULT_TENANT,
        context: SessionContext | None = None,
    ) -> ChatCompletionResponse:
        """A whole chat completion (``request.stream`` is ignored; see ``chat_stream``).
        ``context``: the session context when the caller built it (the Responses API)."""
        request = _parse(ChatCompletionRequest, request)
        self._model(request.model)
        cached = self.observe.cached(request, tenant)
        if cached is not None:
            return cached
        output = self.output.open_choices(request, tenant)
        context = context or await self.memory.session_context(request, tenant)
        message = self._message(context, tenant, stream=False)
        try:
            async with aclosing(self._deltas(message, request.session_id)) as deltas:
                finals = [delta async for delta in deltas]
            with self.observe.timed("output_processing", request.model):
                response, answer = self.output.chat_response(request, finals, output)
        except Exception as exc:
            raise self._failed(exc, request.model) from None
        self.observe.remember(request, tenant, response)
        if request.session_id:
            await self._store_turn(request, message, answer)
            response.session_id = request.session_id
        return response

    async def chat_stream(
        self,
        request: ChatCompletionRequest | dict,
        tenant: str = DEFAULT_TENANT,
        context: SessionContext | None = None,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """A chat completion as chunks; stopping the iteration cancels the generation."""
        request = _parse(ChatCompletionRequest, request)
        self._model(request.model)
        output = self.output.open_choices(request, tenant)
        context = context or await self.memory.session_context(request, tenant)
        message = self._message(context, tenant, stream=True)
        stream = ProcessedStream(
            self._deltas(message, request.session_id), output, request.include_usage, request
        )
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:
            raise self._failed(exc, request.model) from None
        finally:
            await stream.aclose()  # closes the deltas' stream: cancels what still runs
        if request.session_id and stream.complete:
            await self._store_turn(request, message, stream.stored())

    async def complete(
        self, request: CompletionRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> CompletionResponse:
        request = _parse(CompletionRequest, request)
        self._model(request.model)
        cached = self.observe.cached(request, tenant)
        if cached is not None:
            return cached
        output = self.output.open_choices(request, tenant)
        message = self._message(SessionContext(request), tenant, stream=False)
        try:
            async with aclosing(self._deltas(message, None)) as deltas:
                finals = [delta async for delta in deltas]
            with self.observe.timed("output_processing", request.model):
                response = self.output.completion_response(request, finals, output)
        except Exception as exc:
            raise self._failed(exc, request.model) from None
        self.observe.remember(request, tenant, response)
        return response

    async def complete_stream(
        self, request: CompletionRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[CompletionResponse]:
        request = _parse(CompletionRequest, request)
        self._model(request.model)
        output = self.output.open_choices(request, tenant)
        message = self._message(SessionContext(request), tenant, stream=True)
        stream = ProcessedStream(
            self._deltas(message, None), output, request.include_usage, request
        )
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:
            raise self._failed(exc, request.model) from None
        finally:
            await stream.aclose()  # closes the deltas' stream: cancels what still runs

    # -- sessions -----------------------------------------------------------------------------

    async def create_session(
        self, request: SessionCreateRequest | dict | None = None, tenant: str = DEFAULT_TENANT
    ) -> SessionInfo:
        return await self.sessions.create(tenant, _parse(SessionCreateRequest, request or {}))

    async def get_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        return await self.sessions.get(session_id, tenant)

    async def list_sessions(self, tenant: str = DEFAULT_TENANT) -> SessionList:
        return SessionList(data=await self.sessions.list(tenant))

    async def delete_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> SessionDeleted:
        # first: if memory cannot forget, the session stays (503)
        await self.memory.forget_session(tenant, session_id)
        await self.sessions.delete(session_id, tenant)
        return SessionDeleted(id=session_id)

    async def preview_context(
        self, session_id: str, request: SessionTurnRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> SessionContextPreview:
        """``POST /v1/sessions/{session_id}/context``: the prompt ``request`` would give the model
        as the session's next turn, by the chat's own path, and its token count; stores nothing."""
        request = _parse(SessionTurnRequest, request).in_session(session_id)
        self._model(request.model)
        context = await self.memory.session_context(request, tenant, touch=False)
        message = self._message(context, tenant, stream=False)
        try:
            prompt = await _routed(self.models[request.model], session_id).preview.remote(message)
        except Exception as exc:
            raise self._failed(exc, request.model) from None
        return SessionContextPreview(session_id=session_id, model=request.model, user=context.user,
                                     memory=context.recall is not None, **prompt)

    # -- responses and conversations (``deployments.responses.api``) --------------------------

    async def create_response(
        self, request: ResponseCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.responses.create_response(request, tenant)

    async def create_response_stream(
        self, request: ResponseCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[dict[str, Any]]:
        events = self.responses.create_response_stream(request, tenant)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def get_response(self, response_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.responses.get_response(response_id, tenant)

    async def delete_response(self, response_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.responses.delete_response(response_id, tenant)

    async def create_conversation(
        self, request: ConversationCreateRequest | dict | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.responses.create_conversation(request, tenant)

    async def get_conversation(self, conversation_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.responses.get_conversation(conversation_id, tenant)

    async def delete_conversation(self, conversation_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.responses.delete_conversation(conversation_id, tenant)

    async def list_conversation_items(
        self, conversation_id: str, tenant: str = DEFAULT_TENANT, limit: int = 20, order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        return await self.responses.list_conversation_items(conversation_id, tenant, limit, order, after)

    async def add_conversation_items(
        self, conversation_id: str, request: ConversationItemsRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.responses.add_conversation_items(conversation_id, request, tenant)

    # -- memory (an M-AI extension; ``deployments.ingress.stores.memory``) ---------------------------

    async def list_memories(
        self,
        user: str,
        tenant: str = DEFAULT_TENANT,
        include_history: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        return await self.memory.list(tenant, user, include_history, limit, offset)

    async def search_memories(
        self, request: MemorySearchRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.memory.search(tenant, request)

    async def add_memory(
        self, request: MemoryCreateRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.memory.add(tenant, request)

    async def add_memory_turn(
        self, request: MemoryTurnRequest | dict, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """Absorb one turn of a conversation held elsewhere (speaker names, its date)."""
        return await self.memory.add_turn(tenant, request)

    async def get_memory(self, memory_id: str, user: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.memory.get(tenant, user, memory_id)

    async def delete_memory(
        self, memory_id: str, user: str, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        return await self.memory.delete(tenant, user, memory_id)

    async def delete_memories(self, user: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.memory.delete_all(tenant, user)

    async def memory_usage(self, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        return await self.memory.usage(tenant)

    # -- models and health --------------------------------------------------------------------

    def list_models(self) -> ModelList:
        """The chat models, then the embedding model (``POST /v1/embeddings``)."""
        return ModelList(data=self.cards + [ModelCard.model_validate(self.embedder.card())])

    async def embed(self, request: EmbeddingRequest | dict, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Embeddings of ``request.input`` (``POST /v1/embeddings``)."""
        return await self.embedder.embed(_parse(EmbeddingRequest, request))

    async def health(self) -> dict[str, Any]:
        """Serve's view of each model: ``EngineDeadError`` (503) unless every model has a
        running replica and its deployment is not unhealthy.

        It asks the Serve controller, not the replicas: a call to a replica would wait in its
        request queue behind the generations and time out under load. A dead engine fails the
        replica's health check (every ``serving.health_check_period_s``), which shows here
        until Serve has replaced the replica. A replica that lost a rank posts it on the health
        board at once while it rebuilds its ranks (actors/tp/supervision.py): 503 when every
        running replica of a model is rebuilding, with the expected rest as ``Retry-After``.
        A live update the replicas refused makes it ``"status": "degraded"`` (still 200) with
        the reason under the model.
        """
        from ray import serve

        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > STATUS_CACHE_S:
            apps = {handle.app_name for handle in self.models.values()}
            self._status_cache = (now, await asyncio.to_thread(serve.status),
                                  await asyncio.to_thread(posted_failures, apps))
        applications, posted = self._status_cache[1].applications, self._status_cache[2]
        report: dict[str, Any] = {}
        for name, handle in self.models.items():
            app = applications.get(handle.app_name)
            deployment = app.deployments.get(handle.deployment_name) if app else None
            if deployment is None:
                raise EngineDeadError(f"model {name}: its deployment is not running")
            running = deployment.replica_states.get("RUNNING", 0)
            draining = deployment.replica_states.get("STOPPING", 0)
            status = str(getattr(deployment.status, "value", deployment.status))
            # shutting down: no replica admits requests (a failed deployment whose last failed
            # replica is being stopped is not draining: its cause is said below)
            if running == 0 and draining and status not in UNHEALTHY:
                grace = self.serving.graceful_shutdown_timeout_s
                raise EngineDeadError(
                    f"model {name}: draining ({draining} replicas finish their running requests "
                    f"within serving.graceful_shutdown_timeout_s={grace:g}); none admits new ones",
                    retry_after=grace,
                )
            if running == 0 or status in UNHEALTHY:
                # Serve's message may hold a replica's stack trace: clients get its summary
                why = f" ({brief(deployment.message)})" if deployment.message else ""
                raise EngineDeadError(
                    f"model {name}: {running} running replicas, deployment {status}{why}"
                )
            down = posted.get((handle.app_name, handle.deployment_name), [])
            if len(down) >= running:  # every running replica is rebuilding its ranks
                raise EngineDeadError(down[0]["reason"], retry_after=remaining_s(down[0]))
            report[name] = {"status": status, "running_replicas": running}
            if draining:
                report[name]["draining_replicas"] = draining
            if down:
                report[name]["recovering_replicas"] = len(down)
                report[name]["recovering"] = down[0]["reason"]
            refused = await asyncio.to_thread(read_refusal, handle.app_name, handle.deployment_name)
            if refused:
                report[name]["live_config_refused"] = refused
        degraded = any("live_config_refused" in m for m in report.values())
        return {"status": "degraded" if degraded else "ok", "models": report}

    async def engine_metrics(self) -> str:
        """``GET /metrics``: every model replica's engine now, in Prometheus text
        (deployments/ingress/engine_metrics.py)."""
        from deployments.ingress.engine_metrics import EngineMetrics

        if getattr(self, "_engine_metrics", None) is None:
            self._engine_metrics = EngineMetrics(self.models)
        return await self._engine_metrics.render()

    async def diagnostics(self, model: str | None = None, window_s: float = 300.0) -> dict[str, Any]:
        """Where requests spend their time over about ``window_s``: the dominant stage and a
        recommendation (``GET /v1/diagnostics``; see ``cluster.observability.diagnosis``)."""
        if model is not None:
            self._model(model)
        return await self.observe.diagnostics(model, window_s)

    # -- internals ----------------------------------------------------------------------------

    def _failed(self, exc: BaseException, model: str) -> BaseException:
        error = as_mai_error(exc)
        self.observe.error(error, model)
        return error

    def _model(self, name: str) -> Any:
        handle = self.models.get(name)
        if handle is None:
            raise ModelNotFoundError(  # 404, as OpenAI answers an unknown model
                f"model={name!r} is not served here; available: {', '.join(sorted(self.models))} "
                f"(GET /v1/models)",
                param="model",
            )
        return handle

    @staticmethod
    def _message(context: SessionContext, tenant: str, stream: bool) -> ModelRequest:
        """The one message the request travels in to its model (``deployments.messages``)."""
        return ModelRequest(context, tenant, stream, sent_at=time.time())

    def _deltas(self, message: ModelRequest, session_id: str | None) -> AsyncIterator[ChoiceDelta]:
        """The engine's deltas for ``message`` from its model's replicas (a session's on the
        replica that holds its turns, ``_routed``), resumed on another replica should its
        replica die mid-stream (``deployments.ingress.migration``). Closing this stream before
        its end (the client left, or the output pipeline ended the answer) cancels the
        generation: the one cancellation path, hop by hop down to the engine."""
        handle = _routed(self._streaming[message.body.model], session_id)
        return self.migration.deltas(message, handle.generate.remote)

    async def _store_turn(
        self, request: ChatCompletionRequest, message: ModelRequest, answer: dict[str, Any]
    ) -> None:
        """The client's turn (not the session history it was sent with) and the answer, with
        tool calls and results as typed items (``protocol.ChatMessage.stored``)."""
        assert request.session_id
        tenant, context = message.tenant, message.context
        kept = [m for m in request.messages if m.role not in ("system", "developer")]
        turn = [m.stored() for m in kept]
        turn.append(answer)
        with self.observe.session_op("append"):
            count = await self.sessions.append(
                request.session_id, tenant, turn, request_id=message.request_id
            )
        context.stored_count = count
        # memory keeps who said what: a message's OpenAI `name` is its speaker
        named = [m.as_dict() | ({"name": m.name} if m.name else {}) for m in kept]
        self.memory.remember_turn(context, tenant, request.session_id, count, [*named, turn[-1]])


__all__ = ["Ingress"]
