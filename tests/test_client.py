"""The client library against a hand-written router: streams, errors, silence, cancel."""

from __future__ import annotations

import asyncio
import socket

import pytest
import zmq.asyncio

from peers import Peer
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import ErrorCode, ProtocolError, RequestFailed, RouterUnavailable
from pichat.protocol import (
    Cancel,
    ChatMessage,
    Chunk,
    Conversations,
    Done,
    Error,
    Heartbeat,
    Request,
    Sampling,
    Status,
    Usage,
)

HI = [ChatMessage("user", "hi")]


async def collect(client: Client, seen: list[Chunk]) -> Done:
    """Stream HI (10 tokens at most), noting each chunk in `seen`; the DONE."""
    reply = None
    async for event in client.stream(HI, sampling=Sampling(temperature=0, max_tokens=10)):
        if isinstance(event, Chunk):
            seen.append(event)
        reply = event
    return reply


@pytest.fixture
async def pair():
    ctx = zmq.asyncio.Context()
    router = Peer(ctx, "tcp://127.0.0.1:*", bind=True)
    client = Client(ClientConfig(router=router.endpoint, silence_timeout=0.5))
    client.connect()
    yield router, client
    client.close()
    router.close()
    ctx.term()


async def test_chat_collects_the_stream(pair):
    router, client = pair
    task = asyncio.create_task(client.chat(HI, session="s1"))
    req = await router.expect(Request, session="s1")
    await router.send(Chunk(req.id, 0, "Hello"))
    await router.send(Chunk(req.id, 1, " you"))
    await router.send(Done(req.id, "w1", "stop", Usage(3, 1, 2, 1.0, 1.0)))
    reply = await task
    assert (reply.text, reply.worker, reply.usage.cached_tokens) == ("Hello you", "w1", 1)
    assert 0 <= reply.ttft <= reply.elapsed


async def test_an_error_reply_raises_with_its_code(pair):
    router, client = pair
    task = asyncio.create_task(client.chat(HI))
    req = await router.expect(Request)
    await router.send(Error(req.id, ErrorCode.BUSY, "all slots busy"))
    with pytest.raises(RequestFailed) as info:
        await task
    assert info.value.code is ErrorCode.BUSY


async def test_router_heartbeats_keep_a_slow_request_alive_and_silence_ends_it(pair):
    router, client = pair
    task = asyncio.create_task(client.chat(HI))
    req = await router.expect(Request)
    for _ in range(8):  # 0.8 s of heartbeats: longer than the 0.5 s silence limit
        await router.send(Heartbeat())
        await asyncio.sleep(0.1)
    assert not task.done()
    # Silence: nothing was streamed yet, so the client sends the request again once (the
    # router may have restarted), then gives up.
    await router.expect(Request, id=req.id)
    with pytest.raises(RouterUnavailable, match="no answer from the router"):
        await task
    # The client gave up, so it tells the router to cancel.
    await router.expect(Cancel, id=req.id)


async def test_an_answer_cut_by_router_silence_goes_on_as_a_continuation(pair):
    router, client = pair
    seen: list[Chunk] = []
    task = asyncio.create_task(collect(client, seen))
    req = await router.expect(Request)
    await router.send(Chunk(req.id, 0, "Hel", tokens=(7, 8)))
    # Silence (the router restarted and forgot it): the client drops the old request and
    # asks for the rest, after the tokens it has, with the token budget left.
    await router.expect(Cancel, id=req.id)
    rest = await router.expect(Request)
    assert rest.id != req.id and rest.messages == req.messages
    assert rest.continuation == (7, 8) and rest.sampling.max_tokens == 8
    await router.send(Chunk(req.id, 1, "stale"))  # the old request's: never delivered
    await router.send(Chunk(rest.id, 0, "lo", tokens=(9,)))
    await router.send(Chunk(rest.id, 1, "!", tokens=(10,)))
    await router.send(Done(rest.id, "w2", "stop", Usage(prompt_tokens=12, completion_tokens=2)))
    done = await task
    assert [c.seq for c in seen] == [0, 1, 2]  # one stream, numbered on
    assert done.failovers == 1
    # As if one worker had answered: the continuation counts as generated, not as prompt.
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (10, 4)


async def test_an_answer_without_token_ids_is_not_continued(pair):
    router, client = pair
    task = asyncio.create_task(client.chat(HI))
    req = await router.expect(Request)
    await router.send(Chunk(req.id, 0, "partial"))  # no token ids: cannot resume exactly
    with pytest.raises(RouterUnavailable):
        await task
    await router.expect(Cancel, id=req.id)  # not a second Request


async def test_no_router_at_all_is_a_clear_error_not_a_hang():
    with socket.socket() as taken:  # bound, never listening: connections are refused
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        await _no_router(port)


async def _no_router(port: int) -> None:
    client = Client(ClientConfig(router=f"tcp://127.0.0.1:{port}", silence_timeout=0.3))
    client.connect()
    try:
        with pytest.raises(RouterUnavailable, match="is it running"):
            await client.chat(HI)
        with pytest.raises(RouterUnavailable):
            await client.status()
    finally:
        client.close()


async def test_out_of_order_chunks_are_a_protocol_error(pair):
    router, client = pair
    task = asyncio.create_task(client.chat(HI))
    req = await router.expect(Request)
    await router.send(Chunk(req.id, 1, "skipped zero"))
    with pytest.raises(ProtocolError, match="chunk 1 arrived where 0 was due"):
        await task


async def test_leaving_a_stream_early_cancels_the_request(pair):
    router, client = pair

    async def first_chunk_only():
        async for event in client.stream(HI):
            return event

    task = asyncio.create_task(first_chunk_only())
    req = await router.expect(Request)
    await router.send(Chunk(req.id, 0, "a"))
    assert (await task).text == "a"
    await router.expect(Cancel, id=req.id)


async def test_concurrent_requests_share_one_socket(pair):
    router, client = pair
    tasks = [asyncio.create_task(client.chat([ChatMessage("user", f"q{i}")])) for i in range(5)]
    ids = [(await router.expect(Request)).id for _ in tasks]
    for rid in reversed(ids):
        await router.send(Chunk(rid, 0, rid))
        await router.send(Done(rid, "w", "stop", Usage()))
    replies = await asyncio.gather(*tasks)
    assert sorted(r.text for r in replies) == sorted(ids)
    assert all(r.text == r.id for r in replies)


async def test_status(pair):
    router, client = pair
    task = asyncio.create_task(client.status())
    await router.expect(Status)
    await router.send(Status({"workers": [], "queue": {"depth": 0}}))
    assert (await task)["queue"] == {"depth": 0}


@pytest.fixture
async def two_routers():
    ctx = zmq.asyncio.Context()
    one = Peer(ctx, "tcp://127.0.0.1:*", bind=True)
    two = Peer(ctx, "tcp://127.0.0.1:*", bind=True)
    client = Client(ClientConfig(router=f"{one.endpoint}, {two.endpoint}",
                                 silence_timeout=0.5))
    client.connect()
    yield one, two, client
    client.close()
    one.close()
    two.close()
    ctx.term()


async def test_an_answer_cut_by_its_routers_death_goes_on_through_the_next_router(two_routers):
    one, two, client = two_routers
    seen: list[Chunk] = []
    task = asyncio.create_task(collect(client, seen))
    req = await one.expect(Request)
    await one.send(Chunk(req.id, 0, "Hel", tokens=(7, 8)))
    await one.expect(Cancel, id=req.id)  # the old one, in case it lives on
    # The first router is silent from now on: the rest is asked of the second.
    rest = await two.expect(Request)
    assert rest.messages == req.messages and rest.continuation == (7, 8)
    assert client.endpoint == two.endpoint and client.moves == 1
    await two.send(Chunk(rest.id, 0, "lo", tokens=(9,)))
    await two.send(Done(rest.id, "w2", "stop", Usage(prompt_tokens=12, completion_tokens=1)))
    done = await task
    assert [c.text for c in seen] == ["Hel", "lo"] and done.failovers == 1
    await one.silent(0.2)  # nothing more went to the silent one


async def test_requests_waiting_on_a_silent_router_move_once_together(two_routers):
    """Three requests wait on the first router when it falls silent: each is sent to the
    second once, and the client moves once (not back to the silent one by the next
    request that notices)."""
    one, two, client = two_routers
    tasks = [asyncio.create_task(client.chat(HI, session=f"s{i}")) for i in range(3)]
    sent = [await one.expect(Request, attempt=0) for _ in tasks]
    first, ids = {r.session for r in sent}, {r.id for r in sent}
    assert first == {"s0", "s1", "s2"}
    again = [await two.expect(Request) for _ in tasks]
    assert {r.session for r in again} == first and client.moves == 1
    # Each sent again as a later attempt: a worker running it for the first router hands
    # it over to this one (and refuses the first router's own copy, should it come back).
    assert {(r.id in ids, r.attempt) for r in again} == {(True, 1)}
    for r in again:
        await two.send(Done(r.id, "w2", "stop", Usage(3, 0, 1, 1.0, 1.0)))
    replies = await asyncio.gather(*tasks)
    assert {r.worker for r in replies} == {"w2"}
    await one.silent(0.2)


async def test_status_and_stored_conversations_come_from_the_router_that_answers(
        two_routers):
    one, two, client = two_routers
    task = asyncio.create_task(client.status())
    await one.expect(Status)  # never answered
    await two.expect(Status)
    await two.send(Status(cluster={"workers": [], "router": "two"}))
    assert (await task)["router"] == "two"
    # Now on the second: a question goes there first, and a create is never asked twice.
    listing = asyncio.create_task(client.conversations("list"))
    asked = await two.expect(Conversations, op="list")
    await two.send(Conversations("list", asked.ref, result=[]))
    assert await listing == []
    with pytest.raises(RouterUnavailable):
        await client.conversations("create", title="x")
    await two.expect(Conversations, op="create")
    await one.silent(0.2)


@pytest.mark.parametrize("router, given, limit", [
    ("tcp://pi1:5555", None, 5.0),  # one router: a long wait before giving up on it
    ("tcp://pi1:5555,tcp://pi2:5555", None, 3.0),  # another takes it: move on sooner
    ("tcp://pi1:5555,tcp://pi2:5555", 8.0, 8.0),  # what the user said, as said
    ("tcp://pi1:5555", 0.5, 0.5),
])
def test_the_silence_limit_is_shorter_when_another_router_can_take_the_request(
        router, given, limit):
    assert ClientConfig(router=router, silence_timeout=given).silence == limit
