"""The router on real sockets, driven by hand-written peers: routing of frames, bad input,
dead and stale workers, cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import pytest
import zmq
import zmq.asyncio

from peers import Peer, eventually
from pichat.config import RouterConfig
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
    Migrate,
    Ready,
    Request,
    RequestId,
    SessionId,
    State,
    StateAck,
    Status,
    Usage,
    encode,
)
from pichat.router.daemon.router import Router
from pichat.router.policy.scheduler import SchedulerConfig


def request(rid: str, session: str | None = None, text: str = "hi") -> Request:
    return Request(RequestId(rid), (ChatMessage("user", text),),
                   session=SessionId(session) if session else None)


def ready(name: str, slots: int = 1, warm: tuple[tuple[str, str], ...] = ()) -> Ready:
    return Ready(name, "m", "sim", slots, 4096, "test", warm)


class Harness:
    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.client_ep = "tcp://127.0.0.1:0"  # the bound ports are read once it runs
        self.worker_ep = "tcp://127.0.0.1:0"
        self.peers: list[Peer] = []

    def client(self, **kwargs) -> Peer:
        peer = Peer(self.ctx, self.client_ep, **kwargs)
        self.peers.append(peer)
        return peer

    async def worker(self, name: str, slots: int = 1,
                     warm: tuple[tuple[str, str], ...] = ()) -> Peer:
        peer = Peer(self.ctx, self.worker_ep)
        self.peers.append(peer)
        await peer.send(ready(name, slots, warm))
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.ctx.term()

    async def router_forgets(self, name: str) -> None:
        await eventually(lambda: name not in {w["name"] for w in self.router.snapshot()["workers"]})


@pytest.fixture
async def h():
    harness = Harness()
    config = RouterConfig(
        clients_bind=harness.client_ep, workers_bind=harness.worker_ep,
        heartbeat_interval=0.1, max_message_bytes=64 * 1024, http="",
        scheduler=SchedulerConfig(worker_expiry=0.5, affinity_wait=0.3, queue_limit=2,
                                  startup_grace=0.0,
                                  cancel_grace=1.0),
    )
    router = Router(config)
    task = asyncio.create_task(router.run())
    await router.ready.wait()
    harness.router = router
    harness.client_ep, harness.worker_ep = router.clients_endpoint, router.workers_endpoint
    yield harness
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    harness.close()


async def workers_known(h: Harness, n: int) -> None:
    await eventually(lambda: len(h.router.workers) == n)


async def test_request_goes_to_the_worker_and_the_stream_comes_back(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1", "s1"))
    got = await worker.expect(Request, id="r1")
    assert got.messages == (ChatMessage("user", "hi"),)
    # The worker sees the session scoped to its owner, the owner's tag, and a lease.
    assert got.session.endswith("~s1") and got.session != "s1"
    assert got.owner and got.owner in got.session and got.lease
    await worker.send(Chunk(RequestId("r1"), 0, "Hel"))
    await worker.send(Chunk(RequestId("r1"), 1, "lo"))
    await worker.send(Done(RequestId("r1"), "w1", "stop", Usage(5, 0, 2, 1.0, 2.0)))
    await client.expect(Chunk, text="Hel", seq=0)
    await client.expect(Chunk, text="lo", seq=1)
    done = await client.expect(Done, finish="stop", worker="w1")
    assert done.usage.prompt_tokens == 5
    status = h.router.snapshot()
    assert status["requests"]["completed"] == 1
    assert status["workers"][0]["busy"] == 0


@pytest.mark.parametrize("frames, code", [
    ([b"just one frame"], ErrorCode.PROTOCOL),
    ([b"HTTP/1.1", b"\x03", b""], ErrorCode.PROTOCOL),
    ([TAG, b"\x03", b"\xc1\xc1"], ErrorCode.PROTOCOL),
    ([TAG, b"\x77", msgpack.packb({})], ErrorCode.PROTOCOL),
    ([b"PICHAT9", b"\x03", msgpack.packb({})], ErrorCode.VERSION),
    ([TAG, bytes([Command.REQUEST]), msgpack.packb({"id": "r9", "messages": 3})],
     ErrorCode.PROTOCOL),
    (encode(ready("sneaky")), ErrorCode.BAD_REQUEST),
    (encode(Done(RequestId("x"), "w", "stop", Usage())), ErrorCode.BAD_REQUEST),
])
async def test_bad_client_frames_get_an_error_and_the_router_keeps_serving(h, frames, code):
    client = h.client()
    await client.send(frames)
    error = await client.expect(Error, code=code)
    assert error.message
    await client.send(Status())
    status = await client.expect(Status)
    assert "workers" in status.cluster


async def test_a_bad_request_error_names_the_request(h):
    client = h.client()
    await client.send([TAG, bytes([Command.REQUEST]), msgpack.packb({"id": "r9", "messages": 3})])
    await client.expect(Error, id="r9", code=ErrorCode.PROTOCOL)


async def test_oversized_message_drops_the_connection_not_the_router(h):
    big = h.client()
    await big.send(encode(request("big", text="x" * 100_000)))
    with pytest.raises(TimeoutError):
        await big.recv(0.3)
    client = h.client()
    await client.send(Status())
    await client.expect(Status)


async def test_no_workers_is_an_immediate_error(h):
    client = h.client()
    await client.send(request("r1"))
    await client.expect(Error, id="r1", code=ErrorCode.NO_WORKERS)


async def test_a_request_id_in_use_by_another_client_is_refused(h):
    worker = await h.worker("w1", slots=2)
    await workers_known(h, 1)
    client, other = h.client(), h.client()
    await client.send(request("same"))
    await other.send(request("same"))
    await other.expect(Error, id="same", code=ErrorCode.BAD_REQUEST)
    # The same client sending it again (it thought the router gone) is not an error,
    # and the request is not run twice.
    await client.send(request("same"))
    await worker.expect(Request, id="same")
    await worker.silent(0.3)
    await client.silent(0.1)


async def test_queue_full_is_busy_at_once(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    client = h.client()
    for i in range(4):  # 1 running + 2 queued (the limit) + 1 refused
        await client.send(request(f"r{i}"))
    await worker.expect(Request, id="r0")
    await client.expect(Error, id="r3", code=ErrorCode.BUSY)


async def test_unknown_worker_is_told_to_register(h):
    stranger = Peer(h.ctx, h.worker_ep)
    h.peers.append(stranger)
    await stranger.send(Heartbeat(busy=0))
    await stranger.expect(Disconnect)


async def test_an_unknown_worker_is_told_once_per_interval_not_per_message(h):
    stranger = Peer(h.ctx, h.worker_ep)
    h.peers.append(stranger)
    for _ in range(5):  # e.g. the chunks it was still streaming when the router restarted
        await stranger.send(Heartbeat())
    await stranger.expect(Disconnect)
    await stranger.silent(0.05)
    await stranger.send(ready("stranger"))
    await workers_known(h, 1)


async def test_bad_worker_frames_are_ignored(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    await worker.send([b"garbage"])
    await worker.send([TAG, bytes([Command.CHUNK]), b"\xc1"])
    client = h.client()
    await client.send(request("r1"))
    await worker.expect(Request, id="r1")


async def test_results_from_a_worker_that_does_not_own_the_request_are_dropped(h):
    owner = await h.worker("owner")
    await workers_known(h, 1)
    intruder = await h.worker("intruder")
    await workers_known(h, 2)
    client = h.client()
    await client.send(request("r1"))
    got_by = owner if await _which(owner, intruder) is owner else intruder
    other = intruder if got_by is owner else owner
    await other.send(Chunk(RequestId("r1"), 0, "forged"))
    await other.send(Done(RequestId("r1"), "x", "stop", Usage()))
    await got_by.send(Chunk(RequestId("r1"), 0, "real"))
    await client.expect(Chunk, text="real")
    assert h.router.snapshot()["requests"]["stale_results"] == 2


async def _which(a: Peer, b: Peer) -> Peer:
    for _ in range(50):
        for peer in (a, b):
            try:
                await peer.expect(Request, timeout=0.05)
                return peer
            except TimeoutError:
                pass
    raise AssertionError("no worker got the request")


async def test_client_cancel_reaches_the_worker_and_frees_the_slot(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1"))
    await worker.expect(Request, id="r1")
    await client.send(Cancel(RequestId("r1")))
    await client.expect(Error, id="r1", code=ErrorCode.CANCELLED)
    await worker.expect(Cancel, id="r1")
    await client.send(request("r2"))
    await worker.silent(0.2)  # slot still busy until the worker confirms
    await worker.send(Done(RequestId("r1"), "w1", "cancelled", Usage()))
    await worker.expect(Request, id="r2")


async def test_a_worker_that_ignores_a_cancel_loses_the_slot_after_the_grace(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)

    async def alive() -> None:  # it heartbeats, so it is not dead: it only ignores CANCEL
        while True:
            await worker.send(Heartbeat())
            await asyncio.sleep(0.1)

    beating = asyncio.create_task(alive())
    try:
        client = h.client()
        await client.send(request("r1"))
        await worker.expect(Request, id="r1")
        await client.send(Cancel(RequestId("r1")))
        await client.expect(Error, id="r1", code=ErrorCode.CANCELLED)
        await worker.expect(Cancel, id="r1")
        await client.send(request("r2"))
        # No DONE ever comes for r1: after --cancel-grace the router writes the slot off.
        await worker.expect(Request, id="r2", timeout=5)
        assert h.router.snapshot()["requests"]["cancels_ignored"] == 1
        await worker.send(Done(RequestId("r1"), "w1", "cancelled", Usage()))  # too late
        await worker.send(Done(RequestId("r2"), "w1", "stop", Usage()))
        await client.expect(Done, id="r2")
        assert h.router.snapshot()["workers"][0]["busy"] == 0
    finally:
        beating.cancel()


async def test_a_client_that_disconnects_gets_its_request_cancelled(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1"))
    await worker.expect(Request, id="r1")
    client.close()
    await worker.expect(Cancel, id="r1", timeout=3)


async def test_silent_worker_is_dead_and_its_request_moves_to_another(h):
    quiet = await h.worker("quiet")
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1", "s1"))
    await quiet.expect(Request, id="r1")
    other = await h.worker("other")
    # `other` heartbeats; `quiet` says nothing more.
    for _ in range(10):
        await other.send(Heartbeat())
        try:
            got = await other.expect(Request, timeout=0.1)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("the request was not re-dispatched")
    assert got.id == "r1"
    assert h.router.snapshot()["requests"]["workers_lost"] == 1
    # The dead worker's late result is discarded, and it is told to re-register.
    await quiet.send(Chunk(RequestId("r1"), 0, "late"))
    await quiet.expect(Disconnect)
    await other.send(Chunk(RequestId("r1"), 0, "on time"))
    await client.expect(Chunk, text="on time")


async def test_streamed_request_on_a_lost_worker_fails_clearly(h):
    worker = await h.worker("w1")
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1"))
    await worker.expect(Request, id="r1")
    await worker.send(Chunk(RequestId("r1"), 0, "partial"))
    await client.expect(Chunk, text="partial")
    await worker.send(Disconnect("bye"))
    error = await client.expect(Error, id="r1", code=ErrorCode.WORKER_LOST)
    assert "lost" in error.message


async def test_warm_claims_count_only_with_the_routers_lease(h):
    # A worker learns the lease of a session the router placed on it...
    home = await h.worker("home", slots=1)
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1", "s7"))
    placed = await home.expect(Request, id="r1")
    await home.send(Done(RequestId("r1"), "home", "stop", Usage(1, 0, 1)))
    await client.expect(Done)
    home.close()
    await h.router_forgets("home")
    # ... and when it announces it again (a restart, a router restart) it gets the session
    # back; a worker claiming it with a forged lease, with the lease under another
    # identity, or claiming another session, gets nothing.
    await h.worker("cold", slots=4)
    await h.worker("forger", slots=4, warm=((placed.session, "0" * 32), ("x~s1", "x")))
    await h.worker("thief", slots=4, warm=((placed.session, placed.lease),))
    await h.worker("home", slots=1, warm=((placed.session, placed.lease),))
    await workers_known(h, 4)
    assert h.router.snapshot()["requests"]["warm_claims_refused"] == 3
    await client.send(request("r2", "s7"))
    await h.peers[-1].expect(Request, id="r2")


async def test_a_turn_begun_through_another_router_brings_the_session_to_its_worker(h):
    """A worker serving several routers says in its heartbeat which sessions a turn began
    for through another (with that router's lease: routers of one cluster share the key):
    their next turn through this router goes there. A claim without this worker's lease
    moves nothing."""
    a = await h.worker("a", slots=4)
    b = await h.worker("b", slots=1)
    await workers_known(h, 2)

    async def beat():
        while True:
            await a.send(Heartbeat())
            await b.send(Heartbeat())
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(beat())
    try:
        await _turns_begun_elsewhere(h, a, b)
    finally:
        beating.cancel()


async def _turns_begun_elsewhere(h: Harness, a: Peer, b: Peer) -> None:
    client = h.client()
    await client.send(request("r1", "s7"))
    placed = await a.expect(Request, id="r1")
    await a.send(Done(RequestId("r1"), "a", "stop", Usage(1, 0, 1)))
    await client.expect(Done)
    await b.send(Heartbeat(warmed=((placed.session, placed.lease), ("x~s1", "0" * 32))))
    await eventually(lambda: h.router.snapshot()["requests"].get("warm_claims_refused") == 2)
    await client.send(request("r2", "s7"))
    await a.expect(Request, id="r2")  # still a's: b showed no lease of its own
    await a.send(Done(RequestId("r2"), "a", "stop", Usage(1, 0, 1)))
    await client.expect(Done)
    # Another router placed turn 3 on b: b's heartbeat says so, with that router's lease.
    lease = h.router.leases.sign("b/b", placed.session)  # (no keys: its name, twice)
    await b.send(Heartbeat(warmed=((placed.session, lease),)))
    home = lambda: h.router.workers.get(h.router.scheduler.warm_worker(placed.session))  # noqa: E731
    await eventually(lambda: home() is not None and home().meta.ready.worker == "b")
    await client.send(request("r4", "s7"))
    await b.expect(Request, id="r4")


# --- KV state transfers (pichat/router/daemon/migration.py) -------------------------------------

def ready_f(name: str, fmt: str = "llama:x:f16") -> Ready:
    return Ready(name, "m", "llama", 1, 4096, "test", engine="batched", kv_type="f16",
                 kv_cells=4096, kv_token_bytes=12288, state_format=fmt)


@contextlib.asynccontextmanager
async def spill_setup(h: Harness, fmt2: str = "llama:x:f16"):
    """w1 served session s1 and is busy with a hog; w2 (format `fmt2`) joined; the next
    turn of s1 spills to w2. Yields (w1, w2, client, w1's REQUEST of turn 1); both workers
    heartbeat meanwhile."""
    w1 = Peer(h.ctx, h.worker_ep)
    h.peers.append(w1)
    await w1.send(ready_f("w1"))
    await workers_known(h, 1)
    client = h.client()
    await client.send(request("r1", "s1"))
    first = await w1.expect(Request, id="r1")
    await w1.send(Done(RequestId("r1"), "w1", "stop", Usage(5, 0, 2, 1.0, 2.0)))
    await client.expect(Done)
    await client.send(request("hog", "other"))
    await w1.expect(Request, id="hog")
    w2 = Peer(h.ctx, h.worker_ep)
    h.peers.append(w2)
    await w2.send(ready_f("w2", fmt2))
    await workers_known(h, 2)

    async def beat():
        while True:
            await w1.send(Heartbeat(busy=1))
            await w2.send(Heartbeat())
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(beat())
    try:
        await client.send(request("r2", "s1"))
        yield w1, w2, client, first
    finally:
        beating.cancel()


async def test_a_spilled_turn_waits_for_its_state_to_move_then_goes_to_the_new_worker(h):
    async with spill_setup(h) as (w1, w2, client, first):
        await moved(h, w1, w2, first)


async def moved(h, w1, w2, first):
    migrate = await w1.expect(Migrate, session=first.session, target="w2")
    await w1.send(State(migrate.transfer, 0, b"k" * 100, last=True, session=first.session,
                        owner=first.owner, format="llama:x:f16", tokens=(1, 2, 3),
                        data_bytes=100, nbytes=112, sha256="0" * 64))
    piece = await w2.expect(State, transfer=migrate.transfer, last=True)
    assert piece.data == b"k" * 100 and piece.tokens == (1, 2, 3)
    await w2.send(StateAck(migrate.transfer, 0, done=True))
    await w1.expect(StateAck, transfer=migrate.transfer, done=True)
    await w2.expect(Request, id="r2")  # only now
    events = h.router.snapshot()["requests"]
    assert events["states_moved"] == 1 and events["state_tokens_moved"] == 3


async def test_state_messages_from_the_wrong_worker_or_for_another_owner_move_nothing(h):
    async with spill_setup(h) as (w1, w2, client, first):
        await refused(h, w1, w2, first)


async def refused(h, w1, w2, first):
    migrate = await w1.expect(Migrate)
    # The target cannot inject pieces, nor the source acknowledge its own.
    await w2.send(State(migrate.transfer, 0, b"evil", last=True, session=first.session,
                        owner=first.owner, format="llama:x:f16", tokens=(1,),
                        data_bytes=4, nbytes=4, sha256="0" * 64))
    await w1.send(StateAck(migrate.transfer, 0, done=True))
    await w1.send(State("no-such-transfer", 0, b"x", last=True))
    # The source names another owner: the transfer is aborted, the turn goes on anyway.
    await w1.send(State(migrate.transfer, 0, b"k", last=True, session=first.session,
                        owner="someone-else", format="llama:x:f16", tokens=(1,),
                        data_bytes=1, nbytes=1, sha256="0" * 64))
    await w1.expect(StateAck, transfer=migrate.transfer)  # refused
    abort = await w2.expect(State, transfer=migrate.transfer)
    assert abort.abort
    await w2.expect(Request, id="r2")
    events = h.router.snapshot()["requests"]
    assert events["state_messages_refused"] == 3 and events["state_transfers_failed"] == 1
    assert events["states_refused_corrupt"] == 1
    assert "states_moved" not in events


async def test_a_source_that_never_answers_delays_the_turn_only_until_the_stall_limit(
        h, monkeypatch):
    import pichat.router.daemon.migration as migration

    monkeypatch.setattr(migration, "STALL_S", 0.3)
    async with spill_setup(h) as (w1, w2, client, first):
        migrate = await w1.expect(Migrate)
        abort = await w2.expect(State, timeout=5)  # after 0.3 s of silence from w1
        assert abort.abort and "stalled" in abort.abort
        await w2.expect(Request, id="r2")
        # The source's piece that crossed the abort is dropped quietly; a piece for a
        # transfer it never had is not.
        await w1.send(State(migrate.transfer, 0, b"late", last=True))
        await w1.send(State("never-was", 0, b"x", last=True))
        # A DONE for no request of its own is counted (stale_results) once both are read
        # (one connection: in order).
        await w1.send(Done(RequestId("ghost"), "w1", "stop", Usage(1, 0, 1, 1.0, 1.0)))
        for _ in range(500):
            if h.router.snapshot()["requests"].get("stale_results"):
                break
            await asyncio.sleep(0.01)
        assert h.router.snapshot()["requests"]["state_messages_refused"] == 1
    assert h.router.snapshot()["requests"]["state_transfers_failed"] == 1
    assert h.router.snapshot()["requests"]["states_refused_stalled"] == 1


async def test_no_transfer_between_workers_of_different_formats(h):
    async with spill_setup(h, fmt2="llama:y:f16") as (w1, w2, client, first):
        await w2.expect(Request, id="r2")  # straight away: the state would not fit w2
    assert "state_transfers_started" not in h.router.snapshot()["requests"]
