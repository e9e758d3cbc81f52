"""The router's HTTP face with real processes: the official `openai` client, raw HTTP for
bad input, metrics, keys, and prefix affinity for clients that keep no session."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from conftest import Cluster

SYSTEM = {"role": "system", "content": "You are a helpful assistant on a Raspberry Pi cluster."}


async def start(cluster: Cluster, *router_args: str, workers: int = 2,
                worker_args: tuple[str, ...] = ("--sim-reply-tokens", "8"),
                backend: str = "sim") -> str:
    """Router + workers; returns the HTTP base URL."""
    cluster.router(*router_args)
    for i in range(workers):
        cluster.worker(f"w{i + 1}", *worker_args, backend=backend)
    status = await cluster.wait_workers(workers)
    return status["router"]["http"]


def client(base: str, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


async def test_chat_completion_with_the_openai_client(cluster: Cluster):
    base = await start(cluster)
    async with client(base) as api:
        reply = await api.chat.completions.create(
            model="pichat", messages=[SYSTEM, {"role": "user", "content": "Hello there"}],
            temperature=0, max_tokens=20)
    assert reply.object == "chat.completion"
    assert len(reply.choices[0].message.content.split()) == 8
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.pichat["worker"] in ("w1", "w2")


async def test_streaming_chat_with_usage(cluster: Cluster):
    base = await start(cluster)
    async with client(base) as api:
        stream = await api.chat.completions.create(
            model="pichat", messages=[{"role": "user", "content": "Stream please"}],
            temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


async def test_a_stateless_second_turn_is_served_from_cache_on_the_same_worker(cluster: Cluster):
    base = await start(cluster)
    async with client(base) as api:
        history = [SYSTEM, {"role": "user", "content": "First question"}]
        first = await api.chat.completions.create(model="pichat", messages=history,
                                                  temperature=0, max_tokens=20)
        history += [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Second question"}]
        second = await api.chat.completions.create(model="pichat", messages=history,
                                                   temperature=0, max_tokens=20)
    assert second.pichat["worker"] == first.pichat["worker"]
    # Everything up to the end of the first answer was reused.
    assert second.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens)


async def test_models_and_an_unknown_model(cluster: Cluster):
    base = await start(cluster)
    async with client(base) as api:
        models = await api.models.list()
        assert [m.id for m in models.data] == ["sim"]
        named = await api.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert named.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as info:
            await api.chat.completions.create(
                model="gpt-7", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


async def test_api_keys(cluster: Cluster, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# the lab's keys\nsecret-one\nsecret-two  # teacher\n")
    base = await start(cluster, "--api-key-file", str(keys), workers=1)
    async with client(base, "wrong") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.chat.completions.create(model="pichat",
                                              messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()
    async with client(base, "secret-two") as api:
        reply = await api.chat.completions.create(
            model="pichat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as r:
            assert r.status == 200  # liveness needs no key
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 401
        async with http.get(f"{base}/metrics",
                            headers={"Authorization": "Bearer secret-one"}) as r:
            assert r.status == 200


async def test_plain_completions(cluster: Cluster):
    base = await start(cluster, workers=1)
    async with client(base) as api:
        reply = await api.completions.create(model="pichat", prompt="Once upon a time",
                                             max_tokens=4, temperature=0)
    assert reply.object == "text_completion"
    assert len(reply.choices[0].text.split()) == 4
    assert reply.usage.prompt_tokens == 4  # four words: no chat template around them


@pytest.mark.parametrize("method, path, body, status, mentions", [
    ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400,
     "temperature"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', 400, "n=1"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "stop"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
    ("POST", "/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    # Shapes that once made a 500: a list where a string belongs, nesting deeper than the
    # parser's recursion, a lone UTF-16 surrogate; and huge values, quoted only clipped.
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": ["user"], "content": "x"}]}', 400, "messages[0].role"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "' + b"r" * 300_000 + b'", "content": "x"}]}', 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "model": "' + b"m" * 300 + b'"}', 400,
     "'model'"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "stop": "' + b"s" * 300 + b'"}', 400,
     "'stop'"),
    ("POST", "/v1/completions", b'{"prompt": "\\udfff"}', 400, "'prompt'"),
    ("POST", "/v1/chat/completions", b"x" * (5 << 20), 413, ""),
    ("GET", "/v1/chat/completions", b"", 405, ""),
    ("GET", "/v1/nothing-here", b"", 404, ""),
])
async def test_bad_http_input_gets_the_right_error_and_the_router_keeps_serving(
        cluster: Cluster, method, path, body, status, mentions):
    base = await start(cluster, workers=1)
    async with aiohttp.ClientSession() as http:
        data = io.BytesIO(body) if len(body) > 1 << 20 else body
        async with http.request(method, base + path, data=data,
                                headers={"Content-Type": "application/json"}) as r:
            assert r.status == status
            error = (await r.json())["error"]
            assert mentions in error["message"]
            assert {"message", "type", "param", "code"} <= set(error)
            assert len(error["message"]) < 400
        async with http.post(base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3}) as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            assert f'pichat_http_errors_total{{status="{status}"}} 1.0' in await r.text()


async def test_no_workers_is_503_with_retry_after(cluster: Cluster):
    cluster.router("--startup-grace", "0")
    async with cluster.client() as zmq_client:
        status = await zmq_client.status()
    async with aiohttp.ClientSession() as http:
        async with http.post(status["router"]["http"] + "/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "5"
            assert (await r.json())["error"]["code"] == "no_workers"


async def test_a_full_queue_is_429_with_retry_after(cluster: Cluster):
    base = await start(cluster, "--queue-limit", "0", workers=1,
                       worker_args=("--sim-gen-tps", "5", "--sim-reply-tokens", "100"))
    body = {"messages": [{"role": "user", "content": "long one"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/chat/completions", json=body) as busy_one:
            await busy_one.content.readline()  # the slot is taken
            async with http.post(base + "/v1/chat/completions", json=body) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "2"
                assert (await r.json())["error"]["type"] == "rate_limit_error"


async def test_a_client_that_disconnects_mid_stream_cancels_the_generation(cluster: Cluster):
    base = await start(cluster, workers=1,
                       worker_args=("--sim-gen-tps", "5", "--sim-reply-tokens", "1000"))
    async with aiohttp.ClientSession() as http:
        r = await http.post(base + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "a long story"}], "stream": True})
        assert r.status == 200
        await r.content.readline()
        r.close()  # hang up
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(base + "/v1/cluster") as c:
                snap = await c.json()
            if snap["workers"][0]["busy"] == 0:
                break
            await asyncio.sleep(0.05)
    assert snap["workers"][0]["busy"] == 0
    assert snap["requests"]["cancelled"] == 1


async def test_metrics_health_and_cluster(cluster: Cluster):
    base = await start(cluster)
    async with client(base) as api:
        for i in range(3):
            await api.chat.completions.create(
                model="pichat", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as r:
            text = await r.text()
            assert r.headers["Content-Type"].startswith("text/plain")
        async with http.get(base + "/health") as r:
            assert (await r.json())["status"] == "ok"
        async with http.get(base + "/v1/cluster") as r:
            snap = await r.json()
    assert 'pichat_requests_total{outcome="completed"} 3.0' in text
    for name in ("pichat_queue_depth", "pichat_ttft_seconds_bucket",
                 "pichat_generation_tokens_per_second_bucket", "pichat_prompt_tokens_total",
                 "pichat_prompt_tokens_cached_total", "pichat_workers_alive 2.0",
                 'pichat_worker_slots{model="sim",worker="w1"} 1.0',
                 'pichat_worker_slots_busy{model="sim",worker="w2"} 0.0',
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert {w["name"] for w in snap["workers"]} == {"w1", "w2"}
    memory = snap["router"]["memory"]
    assert 5 < memory["rss_mb"] < 4096 and memory["python_blocks"] > 1000


async def test_conversations_sharing_a_system_prompt_spread_but_each_stays_put(cluster: Cluster):
    # Slots for every conversation on each worker: none ever waits, so none has a reason
    # to move (one that waits goes to a free worker when that is sooner:
    # tests/test_scheduler.py).
    base = await start(cluster, workers=2,
                       worker_args=("--sim-reply-tokens", "8", "--slots", "6"))
    async with client(base) as api:
        async def converse(i: int) -> list[str]:
            history = [SYSTEM, {"role": "user", "content": f"I am user {i}"}]
            workers = []
            for turn in range(3):
                reply = await api.chat.completions.create(
                    model="pichat", messages=history, temperature=0, max_tokens=20)
                workers.append(reply.pichat["worker"])
                history += [{"role": "assistant", "content": reply.choices[0].message.content},
                            {"role": "user", "content": f"turn {turn}"}]
            return workers

        results = await asyncio.gather(*[converse(i) for i in range(6)])
    for workers in results:
        assert len(set(workers)) == 1, results  # each conversation stayed on its worker
    assert {w[0] for w in results} == {"w1", "w2"}  # the shared prompt did not pile them up


async def test_a_new_conversation_with_the_same_tools_goes_where_they_are_warm(
        cluster: Cluster):
    """Tools come first in the prompt (Open WebUI's 36 built-in ones: ~6,500 tokens, with
    every message): a new conversation offering the same tools goes to the worker that
    read them, not to the idler one that would read them again."""
    base = await start(cluster, workers=2, worker_args=("--sim-reply-tokens", "4"))
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"does thing {i}",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
        for i in range(20)]
    async with client(base) as api:
        async def ask(text: str, offered: list) -> str:
            reply = await api.chat.completions.create(
                model="pichat", messages=[{"role": "user", "content": text}], tools=offered,
                temperature=0, max_tokens=8)
            return reply.pichat["worker"]

        first = await ask("first conversation", tools)
        assert await ask("another conversation", tools) == first
        # Other tools share nothing: by load, the other worker.
        assert await ask("a third one", tools[:3]) != first


async def test_the_llama_backend_through_the_openai_api(cluster: Cluster, tiny_model: Path):
    base = await start(cluster, workers=1, backend="llama",
                       worker_args=("--model", str(tiny_model), "--ctx", "512"))
    async with client(base) as api:
        reply = await api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello world"}],
            max_tokens=12, temperature=0, seed=3)
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content
    assert json.loads(reply.model_dump_json())["usage"]["prompt_tokens"] > 0


async def raw_request(base: str, request: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes (headers the aiohttp client will not write); the whole response."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read() if read else b""
    finally:
        writer.close()


async def test_a_session_header_that_is_not_utf8_is_a_400_naming_it(cluster: Cluster):
    base = await start(cluster, workers=1)
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    response = await raw_request(base, (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nX-Session-Id: \xff\xfe\xfd\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(payload)["error"]["param"] == "X-Session-Id"


async def test_a_body_that_never_arrives_is_a_408(cluster: Cluster):
    base = await start(cluster, "--http-body-timeout", "0.5", workers=1)
    response = await raw_request(base, (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{\"messages\":"))  # and then nothing
    assert response.startswith(b"HTTP/1.1 408")
    assert b"did not arrive" in response


async def test_silent_connections_are_capped_and_closed(cluster: Cluster):
    """What 1,100 idle connections did before: all held, forever. Now a connection that
    has carried no request is untrusted: at most a few from one address (here a quarter
    of --http-max-connections), the oldest closed to make room for a newer one, and each
    closed after --http-idle-timeout anyway."""
    base = await start(cluster, "--http-max-connections", "40", "--http-idle-timeout", "1",
                       workers=1)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    opened = [await asyncio.open_connection(host, int(port)) for _ in range(30)]
    # Each connection is closed: the oldest 20 to make room, the last 10 when they have
    # sent no request for a second. Every read ends, none hangs.
    answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in opened)), 30)
    for _, writer in opened:
        writer.close()
    assert answers == [b""] * 30, [a[:40] for a in answers]
    async with aiohttp.ClientSession() as http:  # the silent ones are gone: it serves again
        async with http.post(base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
            assert r.status == 200
    async with cluster.client() as zmq_client:
        status = await zmq_client.status()
    assert status["security"]["http_connections_evicted"] == 20
    assert status["security"]["http_connections_refused"] == 0


async def test_a_flood_of_silent_connections_never_locks_an_authenticated_client_out(
        cluster: Cluster, tmp_path: Path):
    """256 silent connections from one address used to fill its share for as long as
    they stayed, and every new connection from there (a real client behind the same NAT,
    Open WebUI on the same host) was refused. Now they only churn their own small pool:
    an authenticated client is served before, during and after the flood, on its kept
    connection and on new ones."""
    keys = tmp_path / "api-keys"
    keys.write_text("lab-key\n")
    base = await start(cluster, "--api-key-file", str(keys), "--http-max-connections", "64",
                       "--http-idle-timeout", "60", workers=1)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    body = {"model": "pichat", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3}
    headers = {"Authorization": "Bearer lab-key"}
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def more(n: int) -> None:
        for _ in range(n):
            flood.append(await asyncio.open_connection(host, int(port)))

    try:
        async with aiohttp.ClientSession(headers=headers) as kept:  # one kept connection
            async with kept.post(base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
            await more(256)
            for _ in range(3):
                async with kept.post(base + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                async with aiohttp.ClientSession(headers=headers) as new:  # new connections
                    async with new.post(base + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200
                await more(64)
        # A wrong key proves nothing: its connection stays untrusted, and is churned.
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer nope"}) as bad:
            async with bad.post(base + "/v1/chat/completions", json=body) as r:
                assert r.status == 401
        async with cluster.client() as zmq_client:
            status = await zmq_client.status()
        assert status["security"]["http_connections_evicted"] >= 256 + 3 * 64 - 16
        assert status["security"]["http_connections_refused"] == 0
    finally:
        for _, writer in flood:
            writer.close()


def test_any_json_body_is_a_request_or_a_400_never_an_exception():
    """Property: whatever JSON arrives, parsing gives a request that encodes for the
    wire, or an ApiError 400 naming a field."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pichat.protocol import decode, encode
    from pichat.router.api.openai import ApiError, parse_chat, parse_completion

    keys = st.sampled_from(["messages", "role", "content", "model", "stop", "max_tokens",
                            "temperature", "top_p", "seed", "n", "stream", "stream_options",
                            "include_usage", "user", "prompt", "type", "text"])
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=True), st.text(max_size=12),
                       st.sampled_from(["user", "system", "assistant", "\ud800", "x" * 300]))
    body = st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)), max_leaves=20)

    @settings(max_examples=600, deadline=None)
    @given(body)
    def check(value):
        for parse in (parse_chat, parse_completion):
            try:
                call = parse(value, "r1")
            except ApiError as exc:
                assert exc.status == 400 and exc.message
                continue
            assert decode(encode(call.request)) == call.request

    check()


async def test_status_and_metrics_show_the_same_counts(cluster: Cluster):
    base = await start(cluster, workers=1)
    async with client(base) as api:
        for _ in range(3):
            await api.chat.completions.create(
                model="pichat", messages=[{"role": "user", "content": "count me"}],
                max_tokens=3)
    async with cluster.client() as zmq_client:
        status = (await zmq_client.status())["requests"]
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as r:
            metrics = await r.text()
    assert status["completed"] == 3
    assert 'pichat_requests_total{outcome="completed"} 3.0' in metrics
    assert f"pichat_prompt_tokens_total {float(status['prompt_tokens'])}" in metrics
    placed = status["placed_by_load"] + status["affinity_hits"] + status["prefix_hits"]
    assert placed == 3
