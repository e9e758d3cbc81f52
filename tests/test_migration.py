"""A conversation's KV state moves with it: when the router places a session's turn on
another worker than the one holding it warm, the state goes there through the router
instead of being read again. Real processes, real models."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from conftest import Cluster
from peers import until_status as until
from pichat.protocol import ChatMessage, Sampling

GREEDY = Sampling(temperature=0, max_tokens=32)


def busy(status: dict, name: str) -> bool:
    return any(w["name"] == name and w["busy"] for w in status["workers"])


async def spill_a_turn(cluster: Cluster, worker_args: tuple[str, ...],
                       hog_tokens: int) -> tuple:
    """Turn 1 of a conversation on w1; w1 then busy with another conversation; w2 joins;
    turn 2 spills to w2. Returns (turn 1, turn 2, the router's status)."""
    cluster.router("--affinity-wait", "0.2")
    cluster.worker("w1", *worker_args, backend="llama")
    await cluster.wait_workers(1, timeout=120)
    async with cluster.client(silence_timeout=60) as client:
        history = [ChatMessage("user", "Name three rivers of Europe.")]
        first = await client.chat(history, session="s", sampling=GREEDY)
        hog = asyncio.create_task(client.chat(
            [ChatMessage("user", "Write a long story about a lighthouse.")], session="hog",
            sampling=Sampling(temperature=0, max_tokens=hog_tokens)))
        await until(client, lambda st: busy(st, "w1"))
        cluster.worker("w2", *worker_args, backend="llama")
        await cluster.wait_workers(2, timeout=120)
        history += [ChatMessage("assistant", first.text),
                    ChatMessage("user", "Which of them is the longest?")]
        second = await client.chat(history, session="s", sampling=GREEDY)
        assert not hog.done(), "the hog ended too soon for the turn to spill"
        await hog
        status = await client.status()
    return first, second, status


@pytest.mark.slow
async def test_a_spilled_turn_takes_its_kv_state_along(cluster: Cluster, default_model: Path):
    args = ("--ctx", "2048", "--slots", "1", "--threads", "1")
    first, second, status = await spill_a_turn(cluster, args, hog_tokens=400)
    assert first.worker == "w1" and second.worker == "w2"
    requests = status["requests"]
    assert requests["spills"] == 1 and requests["states_moved"] == 1
    # The whole history came with the state: nothing of it was read again on w2.
    used = first.usage
    assert second.usage.cached_tokens == used.prompt_tokens + used.completion_tokens
    assert requests["state_tokens_moved"] == used.prompt_tokens + used.completion_tokens
    assert "Danube" in second.text or "Volga" in second.text or "Rhine" in second.text


async def test_a_turn_spilled_to_a_worker_of_another_model_is_read_again(
        cluster: Cluster, tmp_path: Path):
    """States move only between workers of one format: w2 runs other weights, so the
    router does not ask w1 for the state and w2 reads the conversation."""
    from tiny_model import write_tiny_model

    # Tiny models with room for a long answer: the hog keeps w1 busy for seconds.
    mine = write_tiny_model(tmp_path / "mine.gguf", n_ctx=8192, endless=True)
    other = write_tiny_model(tmp_path / "other.gguf", n_ctx=8192, seed=1, endless=True)
    cluster.router("--affinity-wait", "0")
    cluster.worker("w1", "--model", str(mine), "--ctx", "8192", backend="llama")
    await cluster.wait_workers(1)
    async with cluster.client(silence_timeout=60) as client:
        history = [ChatMessage("user", "hello there")]
        first = await client.chat(history, session="s", sampling=GREEDY)
        cluster.worker("w2", "--model", str(other), "--ctx", "8192", backend="llama")
        await cluster.wait_workers(2)
        hog = asyncio.create_task(client.chat(
            [ChatMessage("user", "a long one")], session="s",
            sampling=Sampling(temperature=0, max_tokens=8000)))
        await until(client, lambda st: busy(st, "w1"))
        history += [ChatMessage("assistant", first.text), ChatMessage("user", "more")]
        second = await client.chat(history, session="s", sampling=GREEDY)
        assert not hog.done(), "the hog ended too soon for the turn to spill"
        await hog
        status = await client.status()
    assert second.worker == "w2" and second.usage.cached_tokens == 0
    assert status["requests"]["spills"] == 1
    assert "state_transfers_started" not in status["requests"]


async def test_a_draining_worker_hands_its_conversations_over_before_it_leaves(
        cluster: Cluster, tiny_model: Path):
    args = ("--model", str(tiny_model), "--ctx", "1024")
    cluster.router()
    w1 = cluster.worker("w1", *args, backend="llama")
    await cluster.wait_workers(1)
    async with cluster.client(silence_timeout=30) as client:
        histories = {s: [ChatMessage("user", f"hello from {s}")] for s in ("a", "b", "c")}
        first = {s: await client.chat(h, session=s, sampling=GREEDY)
                 for s, h in histories.items()}
        cluster.worker("w2", *args, backend="llama")
        await cluster.wait_workers(2)
        w1.signal(signal.SIGTERM)  # a rolling upgrade, say
        assert w1.popen.wait(60) == 0
        status = await until(client, lambda st: [w["name"] for w in st["workers"]] == ["w2"])
        assert status["requests"]["states_handed_over"] == 3
        for session, history in histories.items():
            history += [ChatMessage("assistant", first[session].text),
                        ChatMessage("user", "and then?")]
            again = await client.chat(history, session=session, sampling=GREEDY)
            assert again.worker == "w2"
            assert again.usage.cached_tokens >= first[session].usage.prompt_tokens
        status = await client.status()
    assert status["requests"]["affinity_hits"] >= 3  # the router knew where they went
