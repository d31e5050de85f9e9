"""The real engine behind Serve: the tiny Llama 2 model at tensor-parallel size 2, its two
rank actors in the replica's placement group, giving the same greedy tokens as the engine
run directly at size 1."""

from __future__ import annotations

import pytest

from cluster.config import ModelConfig
from deployments.protocol import ChatCompletionRequest
from tests.support.serve_harness import app_config

MODEL = "m-ai-tiny"
PROMPT = [{"role": "user", "content": "Tell me about llamas."}]


@pytest.fixture(scope="module")
def real_app(serve_cluster):
    config = app_config(
        models=[{"tp_size": 2, "max_num_seqs": 4, "max_tokens": 16}], rank_num_cpus=1.0
    )
    deployed = serve_cluster.deploy(config, prefix="real", engine_cls=None)  # None: the real engine
    yield deployed
    deployed.delete()


def test_tp2_in_a_placement_group_matches_the_engine_at_tp1(real_app):
    from engine.engine import LLMEngine
    from engine.types import SamplingParams

    info = real_app.llm().describe.remote().result()
    assert [s["rank"] for s in info["ranks"]] == [0, 1] and all(
        s["loaded"] for s in info["ranks"]
    )
    assert {s["placement_group_id"] for s in info["ranks"]} == {info["placement_group"]["id"]}

    request = ChatCompletionRequest(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0.0)
    served = real_app.handle.chat.remote(request).result()
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in real_app.handle.options(stream=True).chat_stream.remote(
            request.model_copy(update={"stream": True})
        )
        if c.choices
    )

    with LLMEngine.from_config(ModelConfig(tp_size=1)) as engine:
        prompt_ids = engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
        direct = engine.generate_text(prompt_ids, SamplingParams(max_tokens=12, temperature=0.0))

    assert served.usage.prompt_tokens == len(prompt_ids)
    assert served.usage.completion_tokens == direct.completion_tokens
    assert served.choices[0].message.content == direct.text
    assert streamed == direct.text
