"""LangChain's OpenAI integration (``langchain-openai``, from PyPI) against M-AI on the real
tiny engine over HTTP: ``ChatOpenAI`` invoke, stream, bind_tools (a forced tool call whose
arguments match the schema), with_structured_output, and ``OpenAIEmbeddings``."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from cluster.config import build_app_config
from cluster.config.serving import hash_api_key
from tests.support.serve_harness import FAST_SERVING, app_config

MODEL = "m-ai-tiny"
KEY = "sk-test-langchain-0123456789"

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(json_schema_extra={"enum": ["Oslo", "Lima"]})
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def app(serve_cluster, tiny_checkpoint):
    base = app_config()
    config = build_app_config(
        {
            "serving": {**FAST_SERVING, "session_state_uri": base.serving.session_state_uri,
                        "rank_num_cpus": 1.0, "api_keys": {hash_api_key(KEY): "acme"}},
            "memory": base.memory.model_dump(mode="json"),
            "models": [{"checkpoint": str(tiny_checkpoint), "max_num_seqs": 8, "max_tokens": 48,
                        "context_length": 1024}],
        },
        "test config",
    )
    deployed = serve_cluster.deploy(config, prefix="langchain", engine_cls=None)  # real engine
    deployed.embedding_model = config.memory.embedder.name
    yield deployed
    deployed.delete()


@pytest.fixture(scope="module")
def llm(app):
    return langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{app.url}/v1", api_key=KEY, max_retries=0, timeout=120,
        temperature=0, max_tokens=16,
    )


def test_invoke_and_stream(llm):
    reply = llm.invoke([("system", "Be brief."), ("human", "Tell me about llamas.")])
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    pieces = [chunk.content for chunk in llm.stream("Tell me about llamas.")]
    assert "".join(pieces) == llm.invoke("Tell me about llamas.").content


def test_bind_tools_with_a_forced_call_gives_schema_valid_arguments(llm):
    bound = llm.bind_tools([Weather], tool_choice="Weather")
    for seed in range(3):
        message = bound.bind(seed=seed, temperature=1.0, max_tokens=160).invoke("What is the weather?")
        assert len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call["name"] == "Weather"
        Weather.model_validate(call["args"])  # the arguments parse and match the schema
    required = llm.bind_tools([Weather], tool_choice="any").bind(max_tokens=160).invoke("Weather?")
    assert required.tool_calls and required.tool_calls[0]["name"] == "Weather"


def test_with_structured_output(llm):
    roomy = llm.model_copy(update={"max_tokens": 160})  # bind() does not reach the parse call
    structured = roomy.with_structured_output(Weather)
    result = structured.invoke("Give me the weather as JSON.")
    assert isinstance(result, Weather)


def test_openai_embeddings(app):
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=app.embedding_model, base_url=f"{app.url}/v1", api_key=KEY, max_retries=0,
        check_embedding_ctx_length=False,  # send text, not OpenAI's token ids
    )
    docs = embeddings.embed_documents(["llamas live in the Andes", "stock prices fell"])
    query = embeddings.embed_query("llamas live in the Andes")
    assert len(docs) == 2 and len(query) == len(docs[0])
    assert query == pytest.approx(docs[0], abs=1e-5)
