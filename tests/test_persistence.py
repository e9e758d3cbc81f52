"""A worker's conversations survive its restart (`--state-dir`): real processes, a real
GGUF model, a worker killed with SIGKILL (as a power cut would) and started again."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Cluster
from peers import until_status as until
from pichat.protocol import ChatMessage, Sampling

GREEDY = Sampling(temperature=0, max_tokens=24)


def on_disk(status: dict) -> int:
    return sum(w["memory"]["disk_states"] for w in status["workers"])


def restored(status: dict) -> int:
    return sum(w["memory"]["restored_from_disk"] for w in status["workers"])


@pytest.mark.parametrize("which", ["tiny", pytest.param("default", marks=pytest.mark.slow)])
async def test_a_worker_killed_and_started_again_answers_its_conversations_warm(
        cluster: Cluster, tiny_model: Path, tmp_path: Path, which: str):
    model = str(tiny_model) if which == "tiny" else "default"
    args = ("--model", model, "--ctx", "1024", "--state-dir", str(tmp_path / "kv"))
    cluster.router()
    worker = cluster.worker("w1", *args, backend="llama")
    await cluster.wait_workers(1, timeout=120)
    async with cluster.client(silence_timeout=30) as client:
        histories = {s: [ChatMessage("user", f"What is the capital of {country}?")]
                     for s, country in (("a", "France"), ("b", "Italy"))}
        first = {}
        for session, history in histories.items():
            first[session] = await client.chat(history, session=session, sampling=GREEDY)
        await until(client, lambda st: on_disk(st) == 2)  # written, not only queued
        worker.kill()
        await until(client, lambda st: not st["workers"])
        cluster.worker("w1", *args, backend="llama")
        await cluster.wait_workers(1, timeout=120)
        again = {}
        for session, history in histories.items():
            history += [ChatMessage("assistant", first[session].text),
                        ChatMessage("user", "And what is its population?")]
            again[session] = await client.chat(history, session=session, sampling=GREEDY)
        # (The worker reports its counts with its next heartbeat.)
        status = await until(client, lambda st: restored(st) == 2)
    assert status["workers"][0]["memory"]["disk_states_refused"] == 0
    assert status["requests"]["affinity_hits"] >= 2  # the router relearned where they live
    for session in histories:
        used = first[session].usage
        held = used.prompt_tokens + used.completion_tokens
        if which == "default":  # the whole history, as if the worker had never stopped
            assert again[session].usage.cached_tokens == held
        else:  # the tiny model's random text may tokenize differently when read back
            assert again[session].usage.cached_tokens >= used.prompt_tokens


async def test_a_damaged_state_file_is_refused_and_the_conversation_read_again(
        cluster: Cluster, tiny_model: Path, tmp_path: Path):
    state_dir = tmp_path / "kv"
    args = ("--model", str(tiny_model), "--ctx", "512", "--state-dir", str(state_dir))
    cluster.router()
    worker = cluster.worker("w1", *args, backend="llama")
    await cluster.wait_workers(1)
    async with cluster.client(silence_timeout=30) as client:
        history = [ChatMessage("user", "hello there")]
        first = await client.chat(history, session="a", sampling=GREEDY)
        await until(client, lambda st: on_disk(st) == 1)
        worker.stop()
        (path,) = state_dir.glob("*.kv")
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0x55  # a flipped bit in the KV bytes
        path.write_bytes(bytes(raw))
        await until(client, lambda st: not st["workers"])
        cluster.worker("w1", *args, backend="llama")
        await cluster.wait_workers(1)
        history += [ChatMessage("assistant", first.text), ChatMessage("user", "more")]
        again = await client.chat(history, session="a", sampling=GREEDY)
        status = await until(client, lambda st: st["workers"][0]["memory"]
                             ["disk_states_refused"] == 1)
    assert again.finish in ("stop", "length") and again.usage.cached_tokens == 0
    assert restored(status) == 0
    assert status["workers"][0]["memory"]["disk_states_refused_format"] == 0  # damaged
