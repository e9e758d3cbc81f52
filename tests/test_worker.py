"""The worker on real sockets, driven by a hand-written router: registration, streaming,
cancellation, bad input, re-registration and reconnection."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import msgpack
import pytest
import zmq.asyncio

from peers import Peer
from pichat.config import SimConfig, WorkerConfig
from pichat.errors import ErrorCode
from pichat.protocol import (
    TAG,
    Cancel,
    ChatMessage,
    Chunk,
    Command,
    Disconnect,
    Done,
    Error,
    Heartbeat,
    Ready,
    Request,
    RequestId,
    Sampling,
    SessionId,
)
from pichat.worker.daemon.worker import Worker, _answer_of, _resumes
from pichat.worker.engine.sim import SimModel


def request(rid: str, text: str = "hello there", session: str | None = "s1",
            **sampling) -> Request:
    return Request(RequestId(rid), (ChatMessage("user", text),),
                   Sampling(temperature=0, **sampling),
                   session=SessionId(session) if session else None,
                   lease=f"lease-{session}" if session else None)


async def start(sim: SimConfig, slots: int = 1, ctx: int = 4096, liveness: int = 50):
    ctx_zmq = zmq.asyncio.Context()
    router = Peer(ctx_zmq, "tcp://127.0.0.1:*", bind=True)
    endpoint = router.endpoint
    config = WorkerConfig(router=endpoint, name="w1", backend="sim", slots=slots,
                          heartbeat_interval=0.1, liveness=liveness, chunk_tokens=4,
                          reconnect_max=0.5, sim=sim, ctx=ctx)
    worker = Worker(config, SimModel(sim, ctx))
    task = asyncio.create_task(worker.run())
    return ctx_zmq, router, worker, task


@pytest.fixture
async def rig(request):
    sim = getattr(request, "param", SimConfig(prompt_tps=1e5, gen_tps=2000, reply_tokens=12))
    ctx, router, worker, task = await start(sim)
    ready = await router.expect(Ready)
    yield router, worker, ready
    worker.stop()
    await asyncio.wait_for(task, 10)
    router.close()
    ctx.term()


async def collect(router: Peer, rid: str, seq: int = 0) -> tuple[str, Done]:
    """`rid`'s chunks from number `seq` on, in order, then its DONE (nothing else)."""
    text = []
    while True:
        message = await router.recv()
        if isinstance(message, Chunk) and message.id == rid:
            assert message.seq == seq
            seq += 1
            text.append(message.text)
        elif isinstance(message, Done) and message.id == rid:
            return "".join(text), message
        else:
            raise AssertionError(f"unexpected {message}")


async def test_ready_announces_the_worker(rig):
    _, _, ready = rig
    assert (ready.worker, ready.model, ready.backend, ready.slots, ready.ctx) == (
        "w1", "sim", "sim", 1, 4096)
    assert ready.warm == ()


async def test_a_request_streams_chunks_then_done_with_usage(rig):
    router, _, _ = rig
    await router.send(request("r1"))
    text, done = await collect(router, "r1")
    assert len(text.split()) == 12
    assert done.worker == "w1" and done.finish == "stop"
    assert done.usage.completion_tokens == 12 and done.usage.cached_tokens == 0
    # The second turn of the session reuses the first one's KV.
    follow = Request(RequestId("r2"), (ChatMessage("user", "hello there"),
                                       ChatMessage("assistant", text), ChatMessage("user", "more")),
                     Sampling(temperature=0), session=SessionId("s1"))
    await router.send(follow)
    _, done2 = await collect(router, "r2")
    assert done2.usage.cached_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_heartbeats_report_load_and_warm_sessions(rig):
    router, _, _ = rig
    await router.send(request("r1", session="s9"))
    await collect(router, "r1")
    beat = await router.expect(Heartbeat, timeout=2)
    assert beat.warm == 1 and beat.busy == 0


@pytest.mark.parametrize("rig", [SimConfig(prompt_tps=1e5, gen_tps=5, reply_tokens=500)],
                         indirect=True)
async def test_cancel_stops_the_generation_promptly(rig):
    router, worker, _ = rig
    await router.send(request("r1"))
    await router.expect(Chunk, seq=0)
    await router.send(Cancel(RequestId("r1")))
    while True:
        message = await router.recv(timeout=2)
        if isinstance(message, Done):
            break
    assert message.finish == "cancelled"
    assert message.usage.completion_tokens < 10
    assert worker.slots.busy == 0


@pytest.mark.parametrize("rig", [SimConfig(prompt_tps=1e5, gen_tps=5, reply_tokens=500)],
                         indirect=True)
async def test_more_requests_than_slots_get_busy(rig):
    router, _, _ = rig
    await router.send(request("r1"))
    await router.send(request("r2"))
    # r1's first tokens may come before r2's refusal (a loaded machine): the next message
    # about r2 is the refusal, and r1 streams on.
    while (message := await router.recv(timeout=10)).id != "r2":
        assert message.id == "r1" and isinstance(message, Chunk), message
    assert isinstance(message, Error) and message.code is ErrorCode.BUSY, message


async def test_malformed_request_gets_an_error_and_the_worker_keeps_serving(rig):
    router, _, _ = rig
    await router.send([TAG, bytes([Command.REQUEST]), msgpack.packb({"id": "bad", "messages": 5})])
    await router.expect(Error, id="bad", code=ErrorCode.PROTOCOL)
    await router.send([b"noise"])
    await router.send(request("r1"))
    _, done = await collect(router, "r1")
    assert done.finish == "stop"


async def test_prompt_longer_than_the_context_is_a_clear_error():
    ctx, router, worker, task = await start(SimConfig(), ctx=64)
    try:
        await router.expect(Ready)
        await router.send(request("r1", text="word " * 100))
        error = await router.expect(Error, id="r1", code=ErrorCode.CONTEXT_LENGTH)
        assert "context holds 64" in error.message
    finally:
        worker.stop()
        await task
        router.close()
        ctx.term()


@pytest.mark.parametrize("rig", [SimConfig(prompt_tps=1e5, gen_tps=5, reply_tokens=500)],
                         indirect=True)
async def test_disconnect_makes_it_drop_its_work_and_register_again(rig):
    router, worker, _ = rig
    await router.send(request("r1"))
    await router.expect(Chunk, seq=0)
    await router.send(Disconnect("unknown worker: send READY"))
    while True:  # late chunks of r1 may be in flight; then READY, and nothing more of r1
        message = await router.recv(timeout=3)
        if isinstance(message, Ready):
            break
        assert isinstance(message, Chunk)
    assert message.warm == (("s1", "lease-s1"),)  # warm, with the router's lease
    await router.silent(0.3)
    assert worker.slots.busy == 0


async def test_silent_router_makes_it_reconnect_and_register_again():
    ctx, router, worker, task = await start(SimConfig(), liveness=3)
    try:
        await router.expect(Ready)
        first = router.peer
        # Say nothing: after 3 heartbeat intervals the worker gives up on this connection.
        await router.expect(Ready, timeout=5)
        assert router.peer != first  # a new connection, a new routing id
    finally:
        worker.stop()
        await task
        router.close()
        ctx.term()


def test_a_worker_warns_when_its_kv_cache_and_store_outgrow_the_machine():
    sim = SimConfig(kv_bytes_per_token=112 * 1024)  # as a 3B model's f16 cache
    config = WorkerConfig(backend="sim", slots=4, ctx=4096, cache_mb=256, sim=sim)
    worker = Worker(config, SimModel(sim, 4096))
    gib = 1 << 30
    # 4 x 4096 tokens x 112 KiB = 1.75 GiB of KV, 0.25 GiB of store, 0.75 GiB headroom.
    warning = worker.memory_warning(total=2 * gib)
    assert warning is not None and "1792 MiB" in warning and "--kv-type q8_0" in warning
    assert worker.memory_warning(total=4 * gib) is None
    assert "KV cache: 4 x 4096 tokens (sim, f16, 112.0 KiB/token) = 1792 MiB" in worker.sizing()


@pytest.mark.parametrize(("had", "want", "chunks"), [
    ((), (), 0),
    ((), (1, 2), 1),
    ((), (1, 2, 3), 2),
    ((), (1, 2, 3, 4, 5), 3),
    ((), (1,), None),  # inside a chunk: not a whole run of chunks
    ((), (1, 2, 9), None),  # another answer
    ((), (1, 2, 3, 4, 5, 6), None),  # more than was made
    ((7,), (7, 1, 2), 1),  # itself a continuation of an answer begun elsewhere
    ((7,), (1, 2), None),
])
def test_a_continuation_takes_over_only_a_whole_run_of_the_chunks_made(had, want, chunks):
    job = SimpleNamespace(request=SimpleNamespace(continuation=had),
                          sent=[("a", (1, 2)), ("b", (3,)), ("c", (4, 5))])
    assert _resumes(job, want) == chunks


def test_only_the_same_question_of_the_same_owner_is_the_same_answer():
    asked = Request("r1", (ChatMessage("user", "hi"),), Sampling(max_tokens=20),
                    session="o~auto-r1", owner="o", lease="L1", timeout=30)
    again = replace(asked, id="r2", session="o~auto-r2", lease="L2", timeout=9,
                    sampling=Sampling(max_tokens=12), continuation=(1, 2))
    assert _answer_of(again) == _answer_of(asked)
    for other in (replace(asked, owner="p"), replace(asked, messages=(ChatMessage("user", "ho"),)),
                  replace(asked, sampling=Sampling(max_tokens=20, temperature=0.1)),
                  replace(asked, tools='[{"name": "f"}]')):
        assert _answer_of(other) != _answer_of(asked)


async def two_routers(sim: SimConfig, heartbeat: float = 0.1, slots: int = 2):
    """A worker registered with two hand-driven routers (both have its READY)."""
    ctx = zmq.asyncio.Context()
    a, b = (Peer(ctx, "tcp://127.0.0.1:*", bind=True) for _ in range(2))
    config = WorkerConfig(router=f"{a.endpoint},{b.endpoint}", name="w1", backend="sim",
                          slots=slots, heartbeat_interval=heartbeat, liveness=50,
                          chunk_tokens=4, sim=sim)
    worker = Worker(config, SimModel(sim, 4096))
    task = asyncio.create_task(worker.run())
    for router in (a, b):
        await router.expect(Ready)
    return ctx, a, b, worker, task


async def end(ctx, a: Peer, b: Peer, worker: Worker, task: asyncio.Task) -> None:
    worker.stop()
    await asyncio.wait_for(task, 10)
    for router in (a, b):
        router.close()
    ctx.term()


async def test_routers_refused_for_want_of_a_slot_take_turns_with_the_busy_one():
    """Router A's answers hold the only slot; B's request is refused ("all slots busy").
    When A's answer ends, A (told by its DONE) asks at once for the slot again: it is
    refused, the slot kept for B, told of it at once (a heartbeat, long before the next
    is due), which then gets it. Then the turn is A's again. A slot kept for a router
    that does not come for it is free for anyone after a heartbeat's time."""
    heartbeat = 2.0
    rig = await two_routers(SimConfig(prompt_tps=1e5, gen_tps=40, reply_tokens=12),
                            heartbeat=heartbeat, slots=1)
    _, a, b, _, _ = rig
    try:
        await a.send(request("a1"))
        await a.expect(Chunk, seq=0)
        await b.send(request("b1", session="s2"))
        await b.expect(Error, id="b1", code=ErrorCode.BUSY)
        await collect(a, "a1", seq=1)
        await a.send(request("a2"))  # at once, as a router with a queue does on DONE
        await a.expect(Error, id="a2", code=ErrorCode.BUSY)
        # B hears where a1 ended (before its DONE, the slot still held), maybe a periodic
        # beat from before; then, long before the next is due, of the slot kept for it.
        told = time.monotonic() + heartbeat / 2
        while (await b.expect(Heartbeat, timeout=told - time.monotonic())).busy:
            pass
        await b.send(request("b1", session="s2"))
        await collect(b, "b1")
        await a.send(request("a2"))  # A was refused meanwhile: the turn is its
        await b.send(request("b2", session="s2"))
        await b.expect(Error, id="b2", code=ErrorCode.BUSY)
        await collect(a, "a2")
        # B is told, the slot kept for it; B never comes: after the heartbeat's time, A.
        await b.expect(Heartbeat, timeout=heartbeat / 2)
        await a.send(request("a3"))
        await a.expect(Error, id="a3", code=ErrorCode.BUSY)
        await asyncio.sleep(heartbeat)  # the keeping runs out (what is tested is that)
        await a.send(request("a3"))
        await collect(a, "a3")
    finally:
        await end(*rig)


async def test_a_request_moves_to_another_router_only_when_its_client_sent_it_again():
    """A worker registered with two routers runs a request for A. The same request sent
    again by its client through B (a later attempt) goes on there, from its first chunk,
    and A hears it ended. A, cut off and back, placing the request again as it held it (the
    same attempt) is refused: the stream through B goes on to its end untouched."""
    rig = await two_routers(SimConfig(prompt_tps=1e5, gen_tps=40, reply_tokens=40))
    _, a, b, worker, _ = rig
    try:
        asked = request("r1")
        await a.send(asked)
        await a.expect(Chunk, seq=0)
        await b.send(replace(asked, attempt=1))
        await a.expect(Error, id="r1", code=ErrorCode.CANCELLED)
        await b.expect(Chunk, id="r1", seq=0)  # from its first chunk
        await a.send(asked)  # A's stale copy
        refused = await a.expect(Error, id="r1", code=ErrorCode.CANCELLED)
        assert "another router" in refused.message
        _, done = await collect(b, "r1", seq=1)  # the rest, in order, then DONE
        assert done.usage.completion_tokens == 40 and worker.jobs == {}
    finally:
        await end(*rig)


async def test_a_continuation_takes_over_from_another_router_only_when_its_client_sent_it():
    """A runs r1. Its client, A silent, asks B for the rest after the first chunk (a
    later attempt, a new id): the answer running here goes on as B's. A, back, continuing
    r1 itself after that chunk (its client's try as it held it) is refused, and B's
    stream goes on to its end."""
    rig = await two_routers(SimConfig(prompt_tps=1e5, gen_tps=40, reply_tokens=40))
    _, a, b, worker, _ = rig
    try:
        asked = request("r1")
        await a.send(asked)
        first = await a.expect(Chunk, seq=0)
        rest = replace(asked, id=RequestId("r2"), continuation=first.tokens, attempt=1)
        await b.send(rest)
        await a.expect(Error, id="r1", code=ErrorCode.CANCELLED)
        await b.expect(Chunk, id="r2", seq=0)  # the answer after the first chunk
        await a.send(replace(asked, continuation=first.tokens))  # A's own failover
        refused = await a.expect(Error, id="r1", code=ErrorCode.CANCELLED)
        assert "another router" in refused.message
        await collect(b, "r2", seq=1)
        assert worker.jobs == {}
    finally:
        await end(*rig)
