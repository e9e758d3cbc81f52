"""Ollama's API through the official `ollama` package, against real router and worker
processes: chat and generate streamed and not, tags, show, ps, version, embed, its error
shape; tools and formats on the default model."""

from __future__ import annotations

import json

import numpy as np
import ollama
import pytest

from conftest import Cluster

pytestmark = pytest.mark.asyncio


async def test_the_ollama_client_chats_generates_lists_and_embeds(cluster: Cluster):
    cluster.router()
    cluster.worker("w1", "--sim-reply-tokens", "5", "--model", "llama3.2")
    await cluster.wait_workers(1)
    c = ollama.AsyncClient(host=cluster.http_url)
    try:
        await talk(c)
    finally:
        await c.close()


async def talk(c: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    reply = await c.chat(model="llama3.2", messages=messages, options={"temperature": 0})
    assert reply.done and reply.done_reason == "stop" and reply.message.role == "assistant"
    assert len(reply.message.content.split()) == 5 and reply.eval_count == 5
    pieces = [part async for part in await c.chat(model="llama3.2", messages=messages,
                                                   stream=True, options={"temperature": 0})]
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])
    assert "".join(p.message.content for p in pieces) == reply.message.content
    # The second turn of the same conversation goes back to its warm state (affinity).
    again = await c.chat(model="llama3.2", messages=[
        *messages, {"role": "assistant", "content": reply.message.content},
        {"role": "user", "content": "And at sunset?"}], options={"num_predict": 3})
    assert again.prompt_eval_count < 10 and again.eval_count == 3 and again.done_reason == "length"
    generated = await c.generate(model="llama3.2", prompt="Once upon a time",
                                 options={"temperature": 0, "stop": ["zzz"]})
    assert generated.done and len(generated.response.split()) == 5
    streamed = [p async for p in await c.generate(model="llama3.2", prompt="Hi", stream=True)]
    assert streamed[-1].done and "".join(p.response for p in streamed).strip()

    tags = await c.list()
    assert [m.model for m in tags.models] == ["llama3.2"]
    shown = await c.show("llama3.2")
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    running = await c.ps()
    assert [m.model for m in running.models] == ["llama3.2"]
    version = await c._request_raw("GET", "/api/version")
    assert "pichat" in version.json()["version"]
    embedded = await c.embed(model="llama3.2", input=["red apples", "red apples", "blue sky"])
    a, b, other = (np.array(v) for v in embedded.embeddings)
    assert np.allclose(a, b) and a @ other < 0.9 and embedded.prompt_eval_count == 6
    legacy = await c.embeddings(model="llama3.2", prompt="red apples")
    assert np.allclose(legacy.embedding, a)

    # Ollama's error shape, and the router serves on.
    with pytest.raises(ollama.ResponseError) as info:
        await c.chat(model="mistral", messages=messages)
    assert info.value.status_code == 404 and "not served" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        await c.pull("llama3.2")
    assert info.value.status_code == 400 and "pichat models" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        await c.delete("llama3.2")
    assert info.value.status_code == 400
    for bad in ({"options": {"temperature": "hot"}}, {"options": {"stop": [""]}},
                {"messages": [{"role": "robot", "content": "x"}]},
                # Grammar bombs, and a schema no worker would take, refused by the router.
                {"format": {"type": "string", "pattern": "^a{30000000}$"}},
                {"format": {"type": "string", "pattern": "^(a+)+$"}},
                {"format": {"enum": ["x" * 100] * 1000}}):
        with pytest.raises(ollama.ResponseError) as info:
            await c.chat(**{"model": "llama3.2", "messages": messages, **bad})
        assert info.value.status_code == 400 and info.value.error
        assert "format" in info.value.error or "format" not in bad
    assert (await c.chat(model="llama3.2", messages=messages)).done


@pytest.mark.slow
async def test_ollama_tools_and_formats_on_the_default_model(cluster: Cluster, default_model):
    cluster.router()
    cluster.worker("w1", "--model", str(default_model), "--ctx", "2048", "--threads", "2",
                   backend="llama")
    await cluster.wait_workers(1, timeout=300)
    c = ollama.AsyncClient(host=cluster.http_url)
    try:
        # The listing tells the truth about the GGUF, as Ollama's does: clients show it.
        listed = (await c.list()).models[0]
        assert listed.size == default_model.stat().st_size
        assert listed.details.family == "qwen2" and listed.details.families == ["qwen2"]
        from gguf import GGUFReader

        from pichat.worker.engine.llama import parameter_size
        stored = sum(int(t.n_elements) for t in GGUFReader(str(default_model)).tensors)
        assert listed.details.parameter_size == parameter_size(stored)  # the file's count
        assert listed.details.quantization_level == "Q4_K_M"
        running = (await c.ps()).models[0]
        assert running.size > listed.size  # the weights and the KV cache
        await tools_and_formats(c)
    finally:
        await c.close()


@pytest.mark.parametrize("n, written", [(494_032_768, "494.03M"), (3_212_749_888, "3.21B"),
                                        (268_098_176, "268.10M"), (999, "999")])
async def test_parameter_counts_are_written_as_ollama_writes_them(n, written):
    from pichat.worker.engine.llama import parameter_size

    assert parameter_size(n) == written


async def tools_and_formats(c: ollama.AsyncClient) -> None:
    model = (await c.list()).models[0].model

    def get_weather(city: str) -> str:
        """The current weather in a city.

        Args:
            city: The city's name
        """
        return "sunny"

    asked = await c.chat(model=model, tools=[get_weather], options={"temperature": 0},
                         messages=[{"role": "user", "content": "What is the weather in Rome?"}])
    (call,) = asked.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments["city"].lower().startswith("rome")
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"]}
    answer = await c.chat(model=model, format=schema, options={"temperature": 0},
                          messages=[{"role": "user", "content": "Tell me about Rome."}])
    data = json.loads(answer.message.content)
    assert isinstance(data["city"], str) and isinstance(data["population"], int)
    plain = await c.generate(model=model, prompt="Name two colours.", format="json",
                             options={"temperature": 0, "num_predict": 48})
    assert isinstance(json.loads(plain.response), dict)
