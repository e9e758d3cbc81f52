"""Fuzzing the router's and a worker's sockets with malformed, truncated, oversized and
wrong-version messages, as a worker and as a client (hypothesis). Afterwards: no crash,
no hang, no leaked slot, and a well-formed request is still answered."""

from __future__ import annotations

import asyncio
import time

import msgpack
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Cluster
from peers import Peer
from pichat.protocol import (
    TAG,
    ChatMessage,
    Chunk,
    Command,
    Done,
    Heartbeat,
    Ready,
    Request,
    RequestId,
    encode,
)

MAX_BYTES = 64 * 1024

FIELDS = ["id", "messages", "role", "content", "sampling", "max_tokens", "temperature", "seq",
          "text", "tokens", "usage", "worker", "model", "slots", "ctx", "backend", "version",
          "sessions", "session", "continuation", "prompt", "finish", "code", "message", "busy",
          "draining", "evicted", "cluster", "reason", "timeout", "stop", "seed"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)),
    max_leaves=12)


def body(strategy) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda v: msgpack.packb(v, use_bin_type=True))


near_request = st.fixed_dictionaries({
    "id": st.one_of(st.text(min_size=1, max_size=70), st.integers(-2**63, 2**63 - 1)),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x", 3]),
                                        "content": st.one_of(st.text(max_size=30), st.none())}),
                 max_size=3),
        values),
}, optional={"sampling": st.one_of(values, st.fixed_dictionaries(
    {}, optional={"max_tokens": st.integers(-5, 10**7), "temperature": st.floats(),
                  "stop": values, "seed": st.integers(-5, 2**40)})),
    "continuation": values, "prompt": values, "session": values})

commands = st.sampled_from([bytes([c]) for c in Command] + [b"\x00", b"\xff", b"\x03\x03"])

def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


# Adversarial sizes and shapes from the protocol's own grammar: a real field of a real
# command holding a container of many tiny containers (cheap to send, costly to decode),
# a huge string, or the wrong type; and well-formed messages with extra frames.
hostile_values = st.one_of(
    st.integers(1, 12_000).map(lambda n: [[]] * n),
    st.integers(1, 6_000).map(lambda n: [{}] * n),
    st.integers(1, 3_000).map(lambda n: [["ab"] * 8] * n),
    st.integers(1, 40_000).map(lambda n: "x" * n),
    st.integers(1, 20).map(lambda depth: nested(depth)),
    values,
)
hostile_body = st.tuples(st.sampled_from(FIELDS), hostile_values, near_request).map(
    lambda t: {**t[2], t[0]: t[1]})
messages = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=6),                  # noise
    st.tuples(st.just(TAG), commands, body(values)).map(list),                 # any body
    st.tuples(st.just(TAG), st.just(bytes([Command.REQUEST])), body(near_request)).map(list),
    st.tuples(st.sampled_from([b"PICHAT0", b"PICHAT2", b"pichat1", b""]), commands,
              body(values)).map(list),                                         # versions
    st.tuples(st.just(TAG), commands, st.binary(max_size=40)).map(list),       # truncated
    st.tuples(st.just(TAG), commands, st.just(b"\x91" * 1000)).map(list),      # deep nesting
    st.just([TAG, bytes([Command.REQUEST]), b"x" * (MAX_BYTES + 1)]),          # oversized
    st.tuples(st.just(TAG), commands, body(hostile_body)).map(list),           # costly bodies
    st.tuples(st.just(TAG), commands, body(values),
              st.lists(st.binary(max_size=2048), min_size=1, max_size=40))
    .map(lambda t: [*t[:3], *t[3]]),                                           # extra frames
)

FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


async def test_fuzzing_the_router_as_client_and_as_worker(cluster: Cluster):
    router = cluster.router("--max-message-bytes", str(MAX_BYTES), "--queue-timeout", "5",
                            "--request-timeout", "10")
    worker = cluster.worker("real", "--sim-gen-tps", "2000", "--sim-reply-tokens", "3",
                            "--max-message-bytes", str(MAX_BYTES))
    await cluster.wait_workers(1)
    ctx = zmq.Context()
    socks = []

    def fresh() -> tuple[zmq.Socket, zmq.Socket]:
        for s in socks:
            s.close(linger=0)
        socks.clear()
        for endpoint in (cluster.client_endpoint, cluster.worker_endpoint):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10_000)
            s.connect(endpoint)
            socks.append(s)
        return socks[0], socks[1]

    as_client, as_worker = fresh()
    sent = 0

    @FUZZ
    @given(frames=messages, target=st.booleans())
    def fuzz(frames, target):
        nonlocal as_client, as_worker, sent
        sock = as_client if target else as_worker
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        sent += 1
        if sent % 50 == 0:  # oversized messages drop connections: start afresh now and then
            as_client, as_worker = fresh()
        drain(as_client)
        drain(as_worker)

    try:
        fuzz()
        time.sleep(0.5)
        assert router.alive() and worker.alive()
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    # Fake workers registered by the fuzzer expire; what they held moves on or times out.
    async with cluster.client() as client:
        deadline = time.monotonic() + 30
        while True:
            status = await client.status()
            settled = ([w["name"] for w in status["workers"]] == ["real"]
                       and status["requests"]["active"] == 0)
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert settled, status
        assert status["workers"][0]["busy"] == 0  # no leaked slot
        reply = await client.chat([ChatMessage("user", "still there?")])
        assert len(reply.text.split()) == 3
    assert router.alive() and worker.alive()
    assert "bad message" in router.output()


async def start_worker(cluster: Cluster, endpoint: str, *args: str):
    return cluster.spawn("worker", [
        "worker", "--router", endpoint, "--name", "fuzzed", "--backend", "sim",
        "--sim-gen-tps", "2000", "--sim-reply-tokens", "3", "--max-message-bytes",
        str(MAX_BYTES), *args])


async def answer(fake_router: Peer, rid: str) -> str:
    await fake_router.send(Request(RequestId(rid), (ChatMessage("user", "hi"),)))
    text = []
    while True:
        message = await fake_router.recv(timeout=10)
        if isinstance(message, Chunk) and message.id == rid:
            text.append(message.text)
        elif isinstance(message, Done) and message.id == rid:
            return "".join(text)


async def test_fuzzing_a_worker_from_a_fake_router(cluster: Cluster):
    zctx = zmq.asyncio.Context()
    fake_router = Peer(zctx, "tcp://127.0.0.1:*", bind=True)
    endpoint = fake_router.endpoint
    # A long liveness: the fake router sends no heartbeats, and the worker must not
    # reconnect in the middle of the run.
    worker = await start_worker(cluster, endpoint, "--heartbeat", "0.5", "--liveness", "100")
    try:
        await fake_router.expect(Ready, timeout=30)
        identity = fake_router.peer
        examples: list[list[bytes]] = []

        @FUZZ
        @given(frames=messages.filter(lambda f: sum(map(len, f)) <= MAX_BYTES))
        def collect(frames):
            examples.append(frames)

        collect()
        for frames in examples:
            await fake_router.sock.send_multipart([identity, *frames])
        await asyncio.sleep(1.0)
        assert worker.alive()
        while await fake_router.sock.poll(100):  # what it answered to the fuzz
            await fake_router.sock.recv_multipart()
        fake_router.peer = identity
        assert len((await answer(fake_router, "after-fuzz")).split()) == 3
        assert worker.alive()
        assert "bad message from the router" in worker.output()
    finally:
        fake_router.close()
        zctx.term()


async def test_an_oversized_message_cuts_the_link_and_the_worker_comes_back(cluster: Cluster):
    zctx = zmq.asyncio.Context()
    fake_router = Peer(zctx, "tcp://127.0.0.1:*", bind=True)
    endpoint = fake_router.endpoint
    worker = await start_worker(cluster, endpoint, "--heartbeat", "0.2", "--liveness", "3")
    try:
        await fake_router.expect(Ready, timeout=30)
        first = fake_router.peer

        async def beat() -> None:  # a live router: the worker has no reason to leave
            while True:
                try:
                    await fake_router.sock.send_multipart([first, *encode(Heartbeat())])
                except zmq.ZMQError:
                    return  # the link is gone
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(beat())
        await fake_router.silent(1.0)  # heartbeats only: the link is stable
        # ZeroMQ drops a connection that brings an oversized message and does not
        # reconnect it; the worker notices the silence and connects afresh.
        await fake_router.send([TAG, bytes([Command.REQUEST]), b"x" * (MAX_BYTES + 1)])
        while True:
            message = await fake_router.recv(timeout=10)
            if isinstance(message, Ready) and fake_router.peer != first:
                break
        beating.cancel()
        assert len((await answer(fake_router, "after")).split()) == 3
        assert worker.alive()
    finally:
        fake_router.close()
        zctx.term()
