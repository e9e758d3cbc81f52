"""No request lost: mid-stream failover, hung workers, draining, router restarts."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.asyncio

from conftest import Cluster
from peers import Peer, eventually, until_status
from pichat.client import Client
from pichat.config import ClientConfig, RouterConfig
from pichat.protocol import (
    ChatMessage,
    Chunk,
    Disconnect,
    Done,
    Ready,
    Request,
    RequestId,
    Sampling,
    Usage,
)
from pichat.router.daemon.router import Router

GREEDY = Sampling(temperature=0, max_tokens=60)
STORY = [ChatMessage("user", "tell me a long story")]


async def test_the_router_continues_a_stream_on_another_worker_token_for_token():
    ctx = zmq.asyncio.Context()
    router = Router(RouterConfig(clients_bind="tcp://127.0.0.1:0",
                                 workers_bind="tcp://127.0.0.1:0", http=""))
    task = asyncio.create_task(router.run())
    await router.ready.wait()
    client_ep, worker_ep = router.clients_endpoint, router.workers_endpoint
    first, second, client = Peer(ctx, worker_ep), Peer(ctx, worker_ep), Peer(ctx, client_ep)
    try:
        await first.send(Ready("first", "m", "sim", 1, 4096, "t"))
        await eventually(lambda: len(router.workers) == 1)
        await second.send(Ready("second", "m", "sim", 1, 4096, "t"))
        await eventually(lambda: len(router.workers) == 2)
        await client.send(Request(RequestId("r1"), tuple(STORY), GREEDY))
        got = await first.expect(Request, id="r1")
        assert got.continuation == ()
        await first.send(Chunk(RequestId("r1"), 0, "Once upon", (11, 12)))
        await first.send(Chunk(RequestId("r1"), 1, " a time", (13, 14)))
        await client.expect(Chunk, seq=0, text="Once upon")
        await client.expect(Chunk, seq=1, text=" a time")
        await first.send(Disconnect("gone"))  # dies mid-answer
        resumed = await second.expect(Request, id="r1")
        assert resumed.continuation == (11, 12, 13, 14)
        assert resumed.sampling.max_tokens == GREEDY.max_tokens - 4
        assert resumed.messages == tuple(STORY)
        await second.send(Chunk(RequestId("r1"), 0, " there was", (15, 16)))
        await second.send(Done(RequestId("r1"), "second", "stop", Usage(9 + 4, 0, 2, 1.0, 1.0)))
        # The client sees one stream: numbering goes on, usage as if one worker answered.
        await client.expect(Chunk, seq=2, text=" there was")
        done = await client.expect(Done, worker="second", failovers=1)
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (9, 6)
        assert router.snapshot()["requests"]["failovers"] == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for peer in (first, second, client):
            peer.close()
        ctx.term()


async def undisturbed(cluster: Cluster, messages, sampling) -> str:
    async with cluster.client() as client:
        return (await client.chat(messages, sampling=sampling)).text


async def streaming_worker(client, timeout: float = 10.0) -> str:
    for _ in range(int(timeout / 0.02)):
        busy = [w["name"] for w in (await client.status())["workers"] if w["busy"]]
        if busy:
            return busy[0]
        await asyncio.sleep(0.02)
    raise AssertionError("nothing was dispatched")


async def test_a_client_given_two_routers_finishes_an_answer_through_the_second(
        cluster: Cluster, tmp_path: Path):
    """`--router A,B`: the router streaming an answer dies; the client asks the other for
    the rest (a continuation after the tokens it has: nothing lost or repeated), and the
    command line goes straight on with the live one."""
    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    try:
        for c in (cluster, other):
            c.router()
            c.worker("w", "--sim-gen-tps", "25", "--sim-reply-tokens", "50",
                     "--chunk-tokens", "1")
            await c.wait_workers(1)
        expected = await undisturbed(other, STORY, GREEDY)
        both = f"{cluster.client_endpoint},{other.client_endpoint}"
        async with Client(ClientConfig(router=both, silence_timeout=2.0)) as client:
            seen: list[str] = []
            task = asyncio.create_task(client.chat(STORY, sampling=GREEDY,
                                                   on_text=seen.append))
            await eventually(lambda: len(seen) >= 5, timeout=30)
            cluster.procs[0].kill()
            reply = await asyncio.wait_for(task, 60)
        assert reply.text == expected and reply.done.failovers == 1
        assert client.moves == 1 and client.endpoint == other.client_endpoint
        asked = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pichat", "ask", "--router", both,
                             "--temperature", "0", "hello"],
            capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0, asked.stderr
        assert len(asked.stdout.split()) == 50
    finally:
        other.close()


async def test_a_worker_given_two_routers_serves_both_and_outlives_either(
        cluster: Cluster, tmp_path: Path):
    """`pichat worker --router A,B`: registered with both, it answers each. A request its
    client sends again through B while A is dead goes on where it runs (its prompt is not
    read again); the worker serves B on, with no restart, and registers again with A when
    A is back. An answer cut mid-stream by A's death goes on where it runs too: the
    client's continuation through B takes it over, token for token."""
    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    try:
        cluster.router()
        other.router()
        worker = cluster.spawn("w", [
            "worker", "--router", f"{cluster.worker_endpoint},{other.worker_endpoint}",
            "--name", "w", "--backend", "sim", "--no-discovery", "--heartbeat", "0.5",
            "--liveness", "30", "--slots", "2", "--sim-prompt-tps", "20",
            "--sim-reply-tokens", "20", "--sim-gen-tps", "5", "--chunk-tokens", "1"])
        for c in (cluster, other):
            await c.wait_workers(1, names={"w"})
            async with c.client() as client:
                assert (await client.chat(STORY, sampling=GREEDY)).worker == "w"
        both = f"{cluster.client_endpoint},{other.client_endpoint}"
        async with Client(ClientConfig(router=both, silence_timeout=2.0)) as client:
            task = asyncio.create_task(client.chat([ChatMessage("user", "word " * 200)],
                                                   sampling=GREEDY))
            await streaming_worker(client)  # being read (10 s): nothing streamed yet
            cluster.procs[0].kill()
            reply = await asyncio.wait_for(task, 60)
        assert len(reply.text.split()) == 20 and client.moves == 1
        assert "came again through" in await worker.wait_output("came again through")
        async with other.client() as client:
            expected = await client.chat(STORY, sampling=GREEDY)
        assert expected.worker == "w"
        again = cluster.router(name="router-again")
        await cluster.wait_workers(1, names={"w"})
        assert worker.alive()
        async with Client(ClientConfig(router=both, silence_timeout=2.0)) as client:
            seen: list[str] = []
            task = asyncio.create_task(client.chat(STORY, sampling=GREEDY,
                                                   on_text=seen.append))
            await eventually(lambda: len(seen) >= 3, timeout=30)  # 4 s of answer
            again.kill()
            reply = await asyncio.wait_for(task, 60)
        assert client.endpoint == other.client_endpoint and reply.done.failovers == 1
        assert "goes on as" in await worker.wait_output("goes on as")
        assert reply.text == expected.text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            expected.usage.prompt_tokens, 20)
    finally:
        other.close()


async def test_the_next_turn_through_another_router_is_warm_where_the_last_ran(
        cluster: Cluster, tmp_path: Path):
    """Two workers serve two routers: a turn placed by A tells B (in the worker's next
    heartbeat to B) where the session is warm, so its next turn through B goes there; and,
    for a client with no session id, which conversation it was."""
    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    try:
        cluster.router()
        other.router()
        for name in ("w1", "w2"):
            cluster.worker(name, also=other)
        for c in (cluster, other):
            await c.wait_workers(2)
        turn = [ChatMessage("user", "tell me a long story")]
        async with cluster.client() as client:
            first = await client.chat(turn, session="s1", sampling=GREEDY)
        async with other.client() as client:
            await until_status(client, lambda s: s["requests"]["sessions_remembered"] == 1)
            turn += [ChatMessage("assistant", first.text), ChatMessage("user", "and then?")]
            second = await client.chat(turn, session="s1", sampling=GREEDY)
        assert second.worker == first.worker
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
        # A client that keeps no session id (as the OpenAI API's): B knows its
        # conversation from the state the worker reports, and sends the next turn there.
        chat = [ChatMessage("user", "a quite different question")]
        async with other.client() as client:
            known = (await client.status())["requests"]["prefixes_remembered"]
        async with cluster.client() as client:
            first = await client.chat(chat, sampling=GREEDY)
        async with other.client() as client:
            await until_status(client, lambda s: s["requests"]["prefixes_remembered"] > known)
            chat += [ChatMessage("assistant", first.text), ChatMessage("user", "why?")]
            second = await client.chat(chat, sampling=GREEDY)
        assert second.worker == first.worker
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
    finally:
        other.close()


async def test_the_next_turn_sent_through_another_router_the_moment_the_last_ends_is_warm(
        cluster: Cluster, tmp_path: Path):
    """As after a failover of the floating address: the client sends its next turn
    through B as soon as A's answer ends. The worker tells B where the conversation is
    before it tells A the answer is done, so B knows it (found with Open WebUI's
    captured chat replayed through two routers: B guessed, and half the turns were
    read again from nothing). Heartbeats 5 s apart: only that message can tell B."""
    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    try:
        cluster.router()
        other.router()
        for name in ("w1", "w2"):
            cluster.worker(name, "--heartbeat", "5", also=other)
        for c in (cluster, other):
            await c.wait_workers(2)
        async with cluster.client() as a, other.client() as b:
            for n in range(6):  # a client with no session id (the OpenAI API's)
                chat = [ChatMessage("user", f"question number {n}")]
                first = await a.chat(chat, sampling=GREEDY)
                chat += [ChatMessage("assistant", first.text), ChatMessage("user", "why?")]
                second = await b.chat(chat, sampling=GREEDY)
                assert second.worker == first.worker, n
                assert second.usage.cached_tokens >= first.usage.prompt_tokens, n
            for n in range(4):  # and with one (pichat's own clients)
                turn = [ChatMessage("user", f"story number {n}")]
                first = await a.chat(turn, session=f"s{n}", sampling=GREEDY)
                turn += [ChatMessage("assistant", first.text), ChatMessage("user", "more")]
                second = await b.chat(turn, session=f"s{n}", sampling=GREEDY)
                assert second.worker == first.worker, n
    finally:
        other.close()


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
async def test_a_worker_lost_mid_answer_is_invisible_to_the_client(cluster: Cluster, fault):
    cluster.router()
    workers = {name: cluster.worker(name, "--sim-gen-tps", "25", "--sim-reply-tokens", "50",
                                    "--chunk-tokens", "1") for name in ("w1", "w2")}
    await cluster.wait_workers(2)
    expected = await undisturbed(cluster, STORY, GREEDY)
    assert len(expected.split()) == 50
    async with cluster.client(silence_timeout=10) as client:
        chunks: list[str] = []
        task = asyncio.create_task(client.chat(STORY, sampling=GREEDY, on_text=chunks.append))
        victim = await streaming_worker(client)
        while len(chunks) < 10:  # well into the answer
            await asyncio.sleep(0.02)
        workers[victim].signal(getattr(signal, fault))
        reply = await asyncio.wait_for(task, 30)
        assert reply.text == expected  # nothing lost, nothing repeated
        assert reply.done.failovers == 1 and reply.worker != victim
        assert reply.usage.completion_tokens == 50
        status = await client.status()
        assert status["requests"]["failovers"] == 1
        if fault == "SIGSTOP":
            # It comes back: its stale chunks are dropped and it registers again.
            workers[victim].signal(signal.SIGCONT)
            await cluster.wait_workers(2, names={"w1", "w2"})
            again = await client.chat(STORY, sampling=GREEDY)
            assert again.text == expected


@pytest.mark.slow
async def test_failover_with_the_default_model_gives_the_undisturbed_answer(
        cluster: Cluster, default_model: Path):
    cluster.router()
    workers = {name: cluster.worker(name, "--ctx", "1024", "--chunk-tokens", "1",
                                    backend="llama") for name in ("w1", "w2")}
    await cluster.wait_workers(2, timeout=120)
    question = [ChatMessage("user", "Explain in about 120 words how a Raspberry Pi boots.")]
    sampling = Sampling(temperature=0, max_tokens=160)
    expected = await undisturbed(cluster, question, sampling)
    async with cluster.client(silence_timeout=30) as client:
        chunks: list[str] = []
        task = asyncio.create_task(client.chat(question, sampling=sampling,
                                               on_text=chunks.append))
        victim = await streaming_worker(client, 60)
        while len(chunks) < 20:
            await asyncio.sleep(0.02)
        workers[victim].kill()
        reply = await asyncio.wait_for(task, 120)
    assert reply.done.failovers == 1
    assert reply.text == expected


async def test_a_draining_worker_finishes_its_answer_and_gets_nothing_new(cluster: Cluster):
    cluster.router()
    slow = cluster.worker("slow", "--sim-gen-tps", "20", "--sim-reply-tokens", "40")
    await cluster.wait_workers(1)
    async with cluster.client() as client:
        long = asyncio.create_task(client.chat(STORY, sampling=GREEDY, session="s-long"))
        assert await streaming_worker(client) == "slow"
        cluster.worker("other", "--sim-reply-tokens", "5")
        await cluster.wait_workers(2)
        slow.signal(signal.SIGTERM)
        for _ in range(100):
            status = await client.status()
            if any(w["draining"] for w in status["workers"]):
                break
            await asyncio.sleep(0.05)
        assert [w["name"] for w in status["workers"] if w["draining"]] == ["slow"]
        short = await client.chat([ChatMessage("user", "quick")], sampling=GREEDY)
        assert short.worker == "other"
        reply = await long
        assert reply.worker == "slow" and reply.done.failovers == 0
        assert len(reply.text.split()) == 40
        assert slow.popen.wait(15) == 0
        await cluster.wait_workers(1, names={"other"})
    assert "1 warm sessions handed back" in cluster.procs[0].output()


async def test_a_waiting_client_survives_a_router_restart(cluster: Cluster):
    router = cluster.router()
    cluster.worker("w1", "--sim-prompt-tps", "20", "--sim-reply-tokens", "5")
    await cluster.wait_workers(1)
    async with cluster.client(silence_timeout=2.0) as client:
        task = asyncio.create_task(client.chat([ChatMessage("user", "word " * 60)],
                                               sampling=GREEDY))
        await streaming_worker(client)  # being read (3 s of prompt), nothing streamed yet
        router.kill()
        cluster.router(name="router2")
        reply = await asyncio.wait_for(task, 30)
    assert len(reply.text.split()) == 5
