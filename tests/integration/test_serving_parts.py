"""The serving layer's parts that need no Ray: stream coalescing, the fake engine, the session
store, serving config and deployment options, API keys, prompts and error mapping.
(They sit here because tests/unit belongs to the engine; they run in well under a second.)"""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from cluster.config import ModelConfig, build_app_config, load_config
from cluster.config.serving import ServingConfig, hash_api_key
from cluster.errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
)
from deployments.app import llm_deployment_options
from deployments.errors import validation_error
from deployments.ingress.auth import DEFAULT_TENANT, ApiKeyAuth
from deployments.ingress.openai_api.inputs import chat_prompt, sampling_params
from deployments.protocol import ChatCompletionRequest
from engine.fake_engine import DEFAULT_REPLY, ByteTokenizer, FakeEngine
from engine.stream_batching import StreamPacing, coalesce
from engine.types import RequestOutput, SamplingParams

# -- stream coalescing ------------------------------------------------------------------------


async def paced(n: int, gap_s: float, closed: list[bool] | None = None):
    try:
        for i in range(n):
            await asyncio.sleep(gap_s)
            yield RequestOutput(
                "r", token_ids=[i], text=f"{i},", finish_reason="length" if i == n - 1 else None
            )
    finally:
        if closed is not None:
            closed.append(True)


def collect(source, interval_s):
    async def run():
        return [out async for out in coalesce(source, interval_s)]

    return asyncio.run(run())


def test_a_fast_stream_is_coalesced_into_few_events_and_loses_nothing():
    events = collect(paced(60, 0.001, None), lambda: 0.03)
    assert "".join(e.text for e in events) == "".join(f"{i}," for i in range(60))
    assert [t for e in events for t in e.token_ids] == list(range(60))
    assert events[0].token_ids == [0]  # the first token goes out at once
    assert len(events) < 15 and events[-1].finish_reason == "length"


def test_a_slow_stream_sends_every_delta_at_once():
    events = collect(paced(8, 0.04, None), lambda: 0.02)
    assert [e.token_ids for e in events] == [[i] for i in range(8)]


def test_an_unstreamed_request_gets_one_output():
    events = collect(paced(10, 0.0, None), None)
    assert len(events) == 1 and events[0].token_ids == list(range(10))


def test_closing_the_coalesced_stream_closes_the_engine_stream():
    closed: list[bool] = []

    async def run():
        stream = coalesce(paced(1000, 0.001, closed), lambda: 0.0)
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_the_interval_grows_with_concurrent_streams():
    pacing = StreamPacing(min_interval_s=0.02, max_events_per_s=400)
    assert pacing.interval_s(1) == 0.02
    assert pacing.interval_s(32) == pytest.approx(0.08)


# -- the fake engine --------------------------------------------------------------------------


def test_fake_engine_cancel_frees_the_slot_at_once_and_admits_the_next():
    async def run():
        engine = FakeEngine(
            ModelConfig(max_num_seqs=1), tokens_per_s=50, tokenizer="bytes", repeat=True
        )
        first = engine.generate("a", SamplingParams(max_tokens=1000), "first")
        await first.__anext__()
        waiting = asyncio.ensure_future(
            engine.generate("b", SamplingParams(max_tokens=1000), "second").__anext__()
        )
        await asyncio.sleep(0.05)
        assert engine.stats().running == 1 and engine.stats().waiting == 1
        await engine.cancel("first")
        assert engine.stats().running == 0  # freed when cancel returns
        await asyncio.wait_for(waiting, 1)
        assert engine.stats().running == 1
        assert [o.finish_reason async for o in first] == ["abort"]

    asyncio.run(run())


def test_fake_engine_queue_limit_and_death():
    async def run():
        engine = FakeEngine(
            ModelConfig(max_num_seqs=1, max_queued_requests=0), tokens_per_s=50, tokenizer="bytes"
        )
        running = engine.generate("a", SamplingParams(max_tokens=100))
        await running.__anext__()
        with pytest.raises(CapacityError):
            await engine.generate("b", SamplingParams()).__anext__()
        engine.kill("test")
        with pytest.raises(EngineDeadError):
            engine.check_health()
        assert [o.finish_reason async for o in running] == ["error"]
        with pytest.raises(EngineDeadError):
            await engine.generate("c", SamplingParams()).__anext__()

    asyncio.run(run())


def test_fake_engine_holds_back_a_possible_stop_string_prefix():
    async def run():
        engine = FakeEngine(tokenizer="bytes", tokens_per_s=0)
        outs = [
            o
            async for o in engine.generate(
                "x", SamplingParams(max_tokens=500, temperature=0, stop=("social",))
            )
        ]
        assert "".join(o.text for o in outs) == DEFAULT_REPLY[: DEFAULT_REPLY.index("social")]
        assert not any("soc" in o.text for o in outs)

    asyncio.run(run())


# -- sessions ---------------------------------------------------------------------------------


# -- config, deployment options, keys ---------------------------------------------------------


def test_serving_config_refuses_clear_keys_and_inconsistent_bounds():
    with pytest.raises(ValidationError, match="hash-key"):
        ServingConfig(api_keys={"sk-clear-key": "acme"})
    with pytest.raises(ValidationError, match="min_replicas=3 is above max_replicas=2"):
        ServingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="max_queued_requests=0 is not allowed") as info:
        build_app_config({"serving": {"max_queued_requests": 0}})
    assert info.value.param == "serving.max_queued_requests"
    assert load_config(environ={"M_AI_SERVING__PORT": "8123"}).serving.port == 8123


def test_llm_deployment_options_reserve_one_bundle_per_rank():
    model = ModelConfig(tp_size=2, max_num_seqs=16)
    options = llm_deployment_options(model, ServingConfig())
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["max_ongoing_requests"] == 32 and options["num_replicas"] == 1
    assert options["max_queued_requests"] == model.max_queued_requests

    gpu = llm_deployment_options(
        ModelConfig(model_size="7B", checkpoint="/m", device="cuda", tp_size=2),
        ServingConfig(min_replicas=1, max_replicas=4),
    )
    assert gpu["placement_group_bundles"][1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert gpu["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in gpu
    threads = llm_deployment_options(ModelConfig(cpu_threads_per_rank=2), ServingConfig())
    assert threads["placement_group_bundles"] == [
        {"CPU": 1.0},
        {"CPU": 2.0},
    ]  # a core per torch thread
    live = llm_deployment_options(model, ServingConfig(), {"model": {"temperature": 0.1}})
    assert live["user_config"] == {"model": {"temperature": 0.1}}


def test_api_keys_map_to_tenants():
    auth = ApiKeyAuth(ServingConfig(api_keys={hash_api_key("sk-a"): "acme"}))
    assert auth.tenant("Bearer sk-a") == "acme"
    for header in (None, "", "Bearer", "Basic sk-a", "Bearer sk-b"):
        with pytest.raises(AuthenticationError):
            auth.tenant(header)
    assert ApiKeyAuth(ServingConfig()).tenant(None) == DEFAULT_TENANT


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": 1}]}
        )
    err = validation_error(info.value.errors())
    assert err.param == "messages[0].content" and "wrong type" in err.message


# -- prompts ----------------------------------------------------------------------------------


def test_a_long_session_history_slides_but_keeps_the_system_prompt():
    tok = ByteTokenizer()
    config = ModelConfig(context_length=300, max_tokens=50)
    history = [{"role": "system", "content": "S"}]
    for i in range(10):
        history += [
            {"role": "user", "content": f"question {i} " * 3},
            {"role": "assistant", "content": f"answer {i} " * 3},
        ]
    request = ChatCompletionRequest(
        model="m", messages=[*history, {"role": "user", "content": "last"}]
    )
    prompt = chat_prompt(tok, request, config, history_len=len(history))
    assert (
        len(prompt.token_ids) + 50 <= 300
        and prompt.dropped_turns > 0
        and prompt.dropped_turns % 2 == 0
    )
    text = tok.decode(prompt.token_ids)
    assert (
        "<<SYS>>\nS\n<</SYS>>" in text
        and "last" in text
        and "question 9" in text
        and "question 0" not in text
    )
    # the messages rendered (what a session's context preview shows): the window after the drops
    assert prompt.token_ids == tok.apply_chat_template(prompt.messages)
    assert prompt.messages[0] == {"role": "system", "content": "S"}
    assert prompt.messages[-1] == {"role": "user", "content": "last"}
    assert len(prompt.messages) == len(history) + 1 - prompt.dropped_turns


def test_sampling_params_use_live_defaults_and_check_the_context():
    config = ModelConfig(context_length=100, temperature=0.3, max_tokens=64)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    params = sampling_params(request, config, prompt_len=60, prompt_field="messages")
    assert params.temperature == 0.3 and params.max_tokens == 40  # clipped to the room left
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(request.model_copy(update={"max_tokens": 41}), config, 60, "messages")
    assert info.value.param == "max_tokens" and "(41 > 100 - 60)" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(request, config, 100, "messages")
    assert info.value.param == "messages"


def test_coalescing_keeps_pace_under_a_wall_clock_budget():
    # 200 deltas 1 ms apart with a 20 ms interval finish in about the source's own time.
    started = time.monotonic()
    events = collect(paced(200, 0.001, None), lambda: 0.02)
    assert time.monotonic() - started < 2.0 and len(events) < 60
