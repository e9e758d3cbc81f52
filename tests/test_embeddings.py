"""POST /v1/embeddings through the official `openai` client against real processes: the
default model's pooled embeddings put a sentence closer to its paraphrase than to an
unrelated sentence; inputs in lists, base64, bounds; an embedding-only worker gets no chat."""

from __future__ import annotations

import base64
import struct

import numpy as np
import openai
import pytest

from conftest import Cluster


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                              timeout=120)


@pytest.mark.slow
async def test_a_sentence_is_closer_to_its_paraphrase_than_to_another(cluster: Cluster,
                                                                      default_model):
    cluster.router()
    cluster.worker("w1", "--model", str(default_model), "--ctx", "1024", "--threads", "2",
                   backend="llama")
    await cluster.wait_workers(1, timeout=300)
    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.",
             "Stock markets fell sharply today.", "How do I reverse a list in Python?",
             "What is the way to invert a Python list?"]
    async with client(cluster.http_url) as c:
        reply = await c.embeddings.create(model="pichat", input=texts)
        packed = await c.embeddings.create(model="pichat", input=texts[0],
                                           encoding_format="base64")
        with pytest.raises(openai.BadRequestError, match="input 1 is .* tokens"):
            await c.embeddings.create(model="pichat", input=["short", "word " * 700])
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == list(range(5)) and vectors.shape[1] >= 256
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # unit length
    sim = vectors @ vectors.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[3, 4] > sim[3, 2] + 0.2
    assert reply.usage.prompt_tokens > 5 * 4
    # Asked for base64, the client hands the string over: float32s of the same vector
    # (alone rather than in a batch of five: equal to rounding).
    alone = np.frombuffer(base64.b64decode(packed.data[0].embedding), "<f4")
    assert alone.shape == vectors[0].shape and alone @ vectors[0] > 0.999


async def test_embeddings_bounds_and_an_embedding_only_worker(cluster: Cluster):
    cluster.router()
    cluster.worker("chat", "--sim-reply-tokens", "3")
    cluster.worker("embedder", "--embedding", "--model", "minilm")
    await cluster.wait_workers(2)
    async with client(cluster.http_url) as c:
        reply = await c.embeddings.create(model="minilm", input=["red apples", "red apples",
                                                                 "blue sky"])
        a, b, other = (np.array(d.embedding) for d in reply.data)
        assert np.allclose(a, b) and a @ other < 0.9
        raw = await c.embeddings.with_raw_response.create(model="minilm", input="x y",
                                                          encoding_format="base64")
        body = raw.http_response.json()
        assert len(base64.b64decode(body["data"][0]["embedding"])) == 64 * 4
        assert struct.unpack("<64f", base64.b64decode(body["data"][0]["embedding"]))
        for bad, param in (([], "input"), ([1, 2, 3], "input"), (["x" * 40_000], "input[0]"),
                           (["ok"] * 129, "input"), ([""], "input")):
            with pytest.raises(openai.BadRequestError) as info:
                await c.embeddings.create(model="minilm", input=bad)
            assert info.value.body["param"] == param, bad
        with pytest.raises(openai.BadRequestError):
            await c.embeddings.create(model="minilm", input="x", dimensions=8)
        # Chat never goes to the embedding-only worker, whatever it is asked for.
        for _ in range(4):
            chat = await c.chat.completions.create(
                model="pichat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert chat.model_extra["pichat"]["worker"] == "chat"
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(
                model="minilm", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert info.value.status_code == 503


async def test_small_requests_of_one_owner_are_batched_and_each_gets_its_vectors():
    import asyncio

    from pichat.protocol import Done, Error, ErrorCode, Request, RequestId, Usage
    from pichat.router.api.embedbatch import EmbedBatcher

    sent: list[Request] = []

    def submit(request, sink, *, owner):
        sent.append(request)
        if any(x == "too long" for x in request.embed):  # the worker refuses the batch
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST, "input is too long"), None)
            return
        vectors = tuple(struct.pack("<f", float(len(x))) for x in request.embed)
        sink.deliver(Done(request.id, "w1", "stop", Usage(prompt_tokens=10 * len(vectors)),
                          embeddings=vectors), None)

    batcher = EmbedBatcher(submit)
    ask = lambda i, *texts, owner="ann": batcher.embed(  # noqa: E731
        Request(RequestId(f"r{i}"), (), embed=texts), owner)
    answers = await asyncio.gather(ask(0, "a"), ask(1, "bb", "ccc"), ask(2, "dddd"),
                                   ask(3, "e", owner="bob"))
    # Ann's three requests went as one; Bob's alone (owners never share a batch).
    assert sorted(len(r.embed) for r in sent) == [1, 4]
    assert [[struct.unpack("<f", v)[0] for v in a.embeddings] for a in answers] == [
        [1.0], [2.0, 3.0], [4.0], [1.0]]
    assert [a.id for a in answers] == ["r0", "r1", "r2", "r3"]
    assert answers[1].usage.prompt_tokens > answers[0].usage.prompt_tokens
    # A batch refused as a whole is sent again request by request: only the bad one fails.
    sent.clear()
    good, bad = await asyncio.gather(ask(4, "fine"), ask(5, "too long"))
    assert isinstance(bad, Error) and isinstance(good, Done) and len(good.embeddings) == 1
    assert [len(r.embed) for r in sent] == [2, 1, 1]
