"""Hostile peers against a real router process: admitted clients and workers that send what
the protocol allows in shape but not in spirit (decoding bombs, endless multipart
messages, floods, stolen names, idle and slow connections). Each test proves a bound: the
router answers with a clear error, keeps its live workers, loses no legitimate request,
and its memory stays within a stated margin (RSS read from its own status)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from conftest import Cluster
from peers import Peer
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import ErrorCode
from pichat.protocol import TAG, ChatMessage, Command, Error, Sampling, Status, encode
from pichat.security import keygen, resolve_keys

HI = [ChatMessage("user", "hi")]
GREEDY = Sampling(temperature=0)


class Peers:
    """Hand-driven peers (and raw sockets), all closed at the end of the test."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.peers: list[Peer] = []
        self.socks: list[zmq.Socket] = []

    def peer(self, endpoint: str, **kwargs) -> Peer:
        self.peers.append(Peer(self.ctx, endpoint, **kwargs))
        return self.peers[-1]

    def socket(self) -> zmq.Socket:
        self.socks.append(self.ctx.socket(zmq.DEALER))
        return self.socks[-1]

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def zctx():
    peers = Peers()
    yield peers
    peers.close()


async def snapshot(cluster: Cluster) -> dict:
    async with cluster.client() as client:
        return await client.status()


async def one_worker(cluster: Cluster) -> dict:
    """A router and one worker; the router's status before any attack."""
    cluster.router()
    cluster.worker("w1")
    await cluster.wait_workers(1)
    return await snapshot(cluster)


def rss(status: dict) -> float:
    return status["router"]["memory"]["rss_mb"]


async def test_decoding_bombs_are_refused_before_they_cost_and_no_worker_is_lost(
        cluster: Cluster, zctx):
    before = await one_worker(cluster)
    # A REQUEST of 3.6 MB whose unknown field is 900 x 4000 empty arrays: 3.6 million
    # Python lists (~250 MB, seconds of CPU) if decoded naively.
    bomb = [TAG, bytes([Command.REQUEST]), msgpack.packb(
        {"id": "bomb", "messages": [{"role": "user", "content": "x"}],
         "junk": [[[]] * 4000] * 900})]
    attacker = zctx.peer(cluster.client_endpoint)
    for _ in range(8):
        await attacker.send(bomb)
    for _ in range(8):
        error = await attacker.expect(Error, code=ErrorCode.PROTOCOL, timeout=30)
        assert "objects" in error.message and len(error.message) < 300
    after = await snapshot(cluster)
    async with cluster.client() as client:
        assert (await client.chat(HI, sampling=GREEDY)).text
    assert [w["name"] for w in after["workers"]] == ["w1"]
    assert after["requests"].get("workers_lost", 0) == 0
    # libzmq held the 8 messages (29 MB) until they were read; nothing more stays.
    assert rss(after) - rss(before) < 64, (rss(before), rss(after))


async def test_a_message_of_endless_frames_is_dropped_unread(cluster: Cluster, zctx):
    before = await one_worker(cluster)
    attacker = zctx.peer(cluster.client_endpoint)
    # Each frame is within --max-message-bytes; libzmq bounds nothing else of a message.
    huge = encode(Status()) + [b"x" * (1 << 20)] * 192
    await attacker.send(huge)
    error = await attacker.expect(Error, code=ErrorCode.PROTOCOL, timeout=30)
    assert "195 frames" in error.message
    after = await snapshot(cluster)
    assert after["security"]["frames_dropped"] == 1
    # libzmq held the 192 MB message until the router dropped it frame by frame; the
    # router's allocator gives such frames back (they are mapped, not heap).
    assert rss(after) - rss(before) < 32, (rss(before), rss(after))
    async with cluster.client() as client:
        assert (await client.chat(HI, sampling=GREEDY)).text


async def test_a_status_flood_that_is_never_read_costs_little(cluster: Cluster, zctx):
    before = await one_worker(cluster)
    flooder = zctx.peer(cluster.client_endpoint)
    query = encode(Status())
    for _ in range(40_000):
        await flooder.send(query)  # and never reads a reply
    async with cluster.client() as client:
        # Served while the flood is still being read (ZeroMQ queues fairly between peers).
        reply = await client.chat(HI, sampling=GREEDY)
        while (after := await client.status())["requests"]["status_replies"] < 40_000:
            await asyncio.sleep(0.1)
    assert reply.text
    # Every query was answered (a flood costs a send each), but the snapshot was built
    # only when something had changed (or each second), and shared by the replies.
    assert after["requests"]["status_snapshots"] < 200
    assert rss(after) - rss(before) < 24, (rss(before), rss(after))


async def test_repeated_refusals_are_logged_once_and_summed_up(cluster: Cluster, keys: Path,
                                                               tmp_path, zctx):
    router = cluster.router("--keys", str(keys), "--log-repeat-window", "1")
    stranger = tmp_path / "stranger"
    keygen(stranger, api_key=False)
    public, secret = resolve_keys(str(stranger)).pair("client")
    server = resolve_keys(str(keys)).router_public()
    for _ in range(300):
        sock = zctx.socket()
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server
        sock.connect(cluster.client_endpoint)
    out = await router.wait_output("more like", timeout=30)
    assert out.count("refused a client connection") <= 3, out
    assert "more like \"refused a client connection from 127.0.0.1: unknown key\"" in out
    cluster.keys = keys
    status = await snapshot(cluster)
    assert status["security"]["refused"]["clients"] >= 100
    assert status["security"]["log_lines_suppressed"] >= 100


async def test_bad_files_in_an_allow_list_never_stop_authentication(cluster: Cluster,
                                                                   keys: Path, tmp_path):
    allowed = keys / "clients"
    (allowed / "empty.key").write_text("")                       # scp has just created it
    (allowed / "folder.key").mkdir()                             # a directory
    (allowed / "junk.key").write_text("public-key = 'not z85'\n")
    os.symlink(tmp_path / "nowhere", allowed / "dangling.key")   # unreadable
    router = cluster.router("--keys", str(keys))
    cluster.worker("w1", "--keys", str(keys))
    cluster.keys = keys
    await cluster.wait_workers(1)
    async with cluster.client() as client:
        assert (await client.chat(HI, sampling=GREEDY)).text
    out = router.output()
    for name in ("empty.key", "folder.key", "junk.key", "dangling.key"):
        assert f"skipping {allowed / name}" in out, out
    # A key copied in place (created empty, then written) is admitted once complete.
    late = tmp_path / "late"
    keygen(late, api_key=False)
    shutil.copy(keys / "router.key", late / "router.key")
    target = allowed / "late.key"
    target.write_text("")
    target.write_bytes((late / "client.key").read_bytes())
    config = ClientConfig(router=cluster.client_endpoint, keys=resolve_keys(str(late)),
                          silence_timeout=10)
    async with Client(config) as client:
        assert (await client.chat(HI, sampling=GREEDY)).text


async def test_a_client_that_fills_every_slot_and_the_queue_delays_another_by_one_answer(
        cluster: Cluster, keys: Path):
    cluster.router("--keys", str(keys), "--queue-limit", "4")
    cluster.worker("w1", "--keys", str(keys), "--sim-gen-tps", "20", "--sim-reply-tokens", "10")
    cluster.keys = keys
    await cluster.wait_workers(1)
    hog = Client(ClientConfig(router=cluster.client_endpoint, keys=resolve_keys(str(keys)),
                              key_name="client", silence_timeout=30))
    ann = Client(ClientConfig(router=cluster.client_endpoint, keys=resolve_keys(str(keys)),
                              key_name="laptop", silence_timeout=30))
    order: list[str] = []

    async def ask(client: Client, who: str, i: int) -> None:
        await client.chat([ChatMessage("user", f"{who} {i}")], sampling=GREEDY)
        order.append(who)

    async with hog, ann:
        hogging = [asyncio.create_task(ask(hog, "hog", i)) for i in range(5)]
        async with cluster.client() as watch:
            while (await watch.status())["queue"]["depth"] < 4:  # 1 running, 4 waiting
                await asyncio.sleep(0.02)
        await ask(ann, "ann", 0)  # the queue is full, but ann's share of it is not used
        hog_results = await asyncio.gather(*hogging, return_exceptions=True)
    # The hog's newest waiting request made room (busy); ann ran next after the one that
    # was running.
    assert order[:2] == ["hog", "ann"], order
    assert sum(isinstance(r, Exception) and "share" in str(r) for r in hog_results) == 1


async def test_a_worker_name_belongs_to_the_key_that_holds_it(cluster: Cluster, keys: Path):
    cluster.router("--keys", str(keys))
    cluster.worker("pi", "--keys", str(keys))
    cluster.keys = keys
    await cluster.wait_workers(1)
    thief = cluster.worker("pi", "--keys", str(keys), "--key-name", "pi2")
    out = await thief.wait_output("in use by another key", timeout=20)
    assert "in use by another key" in out
    status = await snapshot(cluster)
    assert [w["name"] for w in status["workers"]] == ["pi"]
    assert status["requests"]["workers_refused_name"] >= 1


@pytest.fixture
def keys(tmp_path) -> Path:
    keygen(tmp_path / "keys", workers=("pi2",), clients=("laptop",))
    return tmp_path / "keys"


async def test_a_request_only_a_router_could_read_never_holds_a_worker_slot(cluster: Cluster):
    """Thousands of tool calls and their answers (under 1 MB of JSON) once passed the
    router and decoded to more objects than a worker takes: the worker answered nothing
    and its one slot stayed busy for --request-timeout. What the router accepts, a worker
    decodes; what a worker would refuse, the router refuses first, naming the limit."""
    cluster.router("--request-timeout", "600")
    cluster.worker("w1", "--sim-reply-tokens", "3", "--slots", "1", "--sim-prompt-tps", "1e6")
    await cluster.wait_workers(1)
    messages: list[dict] = [{"role": "user", "content": "go"}]
    for i in range(2047):
        messages += [{"role": "assistant", "content": "", "tool_calls": [{
            "id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"}]
    messages.append({"role": "user", "content": "thanks"})  # 4,096 messages: the most
    url = cluster.http_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(url, json={"model": "pichat", "messages": messages,
                                        "max_tokens": 3}) as reply:
            assert reply.status == 200, await reply.text()
            assert (await reply.json())["choices"][0]["message"]["content"]
        async with http.post(url, json={"model": "pichat", "max_tokens": 3, "messages": [
                *messages, messages[-1]]}) as reply:  # one message too many
            assert reply.status == 400 and "4096" in (await reply.json())["error"]["message"]
        async with http.post(url, json={"model": "pichat", "max_tokens": 3, "messages": [
                {"role": "user", "content": "and now?"}]}) as reply:
            assert reply.status == 200  # the slot was never held


async def test_one_key_on_two_workers_still_cannot_attract_the_others_sessions(
        cluster: Cluster, keys: Path, zctx):
    """A key copied to several Pis (or the one `pichat up` used to give every worker)
    made leases per key: a worker under another name could announce the sessions leased
    to its neighbour and have their next turns. A lease is now bound to key and name; and
    `pichat up` gives each worker a key of its own."""
    from pichat.protocol import Disconnect, Done, Ready, Request, Usage

    cluster.router("--keys", str(keys))
    cluster.keys = keys
    secure = resolve_keys(str(keys))

    def fake() -> Peer:  # a worker process holding the key "worker"
        return zctx.peer(cluster.worker_endpoint,
                         secure=lambda sock: secure.secure_client(sock, "worker"))

    home = fake()
    await home.send(Ready("home", "m", "sim", 1, 4096, "test"))
    await cluster.wait_workers(1)
    async with cluster.client() as client:
        asked = asyncio.ensure_future(client.chat([ChatMessage("user", "hi")],
                                                  session="s7", sampling=Sampling(max_tokens=1)))
        placed = await home.expect(Request)
        await home.send(Done(placed.id, "home", "stop", Usage(1, 0, 1)))
        await asked
        await home.send(Disconnect("bye"))
        await eventually_no_workers(cluster)
        # Same key, another name, the neighbour's lease: not its session.
        thief = fake()
        await thief.send(Ready("thief", "m", "sim", 4, 4096, "test",
                               ((placed.session, placed.lease),)))
        await cluster.wait_workers(1, names={"thief"})
        status = await client.status()
        assert status["requests"].get("warm_claims_refused", 0) == 1
        # The owner of the lease, back under its own name with its key, gets it back.
        back = fake()
        await back.send(Ready("home", "m", "sim", 1, 4096, "test",
                              ((placed.session, placed.lease),)))
        await cluster.wait_workers(2)
        status = await client.status()
        assert status["requests"].get("warm_claims_refused", 0) == 1
        again = asyncio.ensure_future(client.chat([ChatMessage("user", "and?")],
                                                  session="s7", sampling=Sampling(max_tokens=1)))
        turn = await back.expect(Request)
        assert turn.session == placed.session
        await back.send(Done(turn.id, "home", "stop", Usage(1, 0, 1)))
        await again


async def eventually_no_workers(cluster: Cluster) -> None:
    for _ in range(200):
        if not (await snapshot(cluster))["workers"]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker was never dropped")
