"""End to end: real `pichat` processes on real TCP sockets (loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import ROOT, Cluster, Proc
from pichat.errors import ErrorCode, RequestFailed
from pichat.protocol import ChatMessage, Sampling
from pichat.security import keygen

GREEDY = Sampling(temperature=0, max_tokens=16)


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


async def test_router_and_two_workers_answer_concurrent_requests(cluster: Cluster):
    cluster.router()
    for name in ("w1", "w2"):
        cluster.worker(name, "--sim-gen-tps", "200", "--sim-reply-tokens", "10")
    await cluster.wait_workers(2)
    async with cluster.client() as client:
        replies = await asyncio.gather(*[
            client.chat(ask(f"question {i}"), session=f"s{i}", sampling=GREEDY) for i in range(12)])
        status = await client.status()
    assert all(len(r.text.split()) == 10 and r.finish == "stop" for r in replies)
    assert {r.worker for r in replies} == {"w1", "w2"}
    assert status["requests"]["completed"] == 12
    assert sum(w["served"] for w in status["workers"]) == 12


async def test_a_sessions_next_turn_returns_to_its_worker_and_reuses_its_cache(
        cluster: Cluster, tiny_model: Path):
    """With the llama backend on a real (tiny) GGUF model."""
    cluster.router()
    for name in ("w1", "w2"):
        cluster.worker(name, "--model", str(tiny_model), "--ctx", "512", backend="llama")
    await cluster.wait_workers(2)
    async with cluster.client() as client:
        histories = {s: ask(f"hello from {s}") for s in ("a", "b", "c", "d")}
        first = {}
        for session, history in histories.items():
            first[session] = await client.chat(history, session=session, sampling=GREEDY)
            history += [ChatMessage("assistant", first[session].text), ChatMessage("user", "more")]
        for session, history in histories.items():
            again = await client.chat(history, session=session, sampling=GREEDY)
            assert again.worker == first[session].worker
            assert again.usage.cached_tokens >= first[session].usage.prompt_tokens
        status = await client.status()
    assert status["requests"]["affinity_hits"] == 4
    assert {w["backend"] for w in status["workers"]} == {"llama"}


@pytest.mark.slow
async def test_the_default_model_answers_sensibly(cluster: Cluster, default_model: Path):
    cluster.router()
    cluster.worker("qwen", "--ctx", "2048", backend="llama")
    status = await cluster.wait_workers(1, timeout=120)
    assert status["workers"][0]["model"] == "qwen2.5-coder-0.5b-instruct"
    async with cluster.client(silence_timeout=30) as client:
        reply = await client.chat(ask("What is the capital of France? Answer in one sentence."),
                                  sampling=Sampling(temperature=0, max_tokens=40))
    assert reply.text.strip()
    assert "Paris" in reply.text
    assert reply.finish == "stop"


async def test_a_worker_killed_before_its_first_chunk_does_not_lose_the_request(cluster: Cluster):
    cluster.router()
    # Slow prompt reading: a 200-word prompt takes ~4 s before the first token.
    workers = {name: cluster.worker(name, "--sim-prompt-tps", "50", "--sim-reply-tokens", "5")
               for name in ("w1", "w2")}
    await cluster.wait_workers(2)
    async with cluster.client() as client:
        task = asyncio.create_task(client.chat(ask("word " * 200), sampling=GREEDY))
        busy = None
        for _ in range(100):
            status = await client.status()
            busy = next((w["name"] for w in status["workers"] if w["busy"]), None)
            if busy:
                break
            await asyncio.sleep(0.05)
        assert busy, "the request was not dispatched"
        workers[busy].kill()
        reply = await task
        assert reply.worker != busy
        assert len(reply.text.split()) == 5
        status = await client.status()
    assert status["requests"]["retries"] == 1
    assert status["requests"]["workers_lost"] == 1


async def test_restarting_the_router_brings_the_workers_back(cluster: Cluster):
    router = cluster.router()
    cluster.worker("w1")
    cluster.worker("w2")
    await cluster.wait_workers(2)
    async with cluster.client() as client:
        before = await client.chat(ask("warm me"), session="keep", sampling=GREEDY)
    router.kill()
    cluster.router(name="router2")
    status = await cluster.wait_workers(2, timeout=30)
    assert status["router"]["up_s"] < 30
    async with cluster.client() as client:
        after = await client.chat(ask("still there?"), session="keep", sampling=GREEDY)
    assert after.text
    # The workers re-announced their warm sessions: the session found its worker again.
    assert after.worker == before.worker


async def test_a_client_waiting_on_a_dead_router_gets_an_error_not_a_hang(cluster: Cluster):
    router = cluster.router()
    cluster.worker("w1", "--sim-gen-tps", "2", "--sim-reply-tokens", "100")
    await cluster.wait_workers(1)
    async with cluster.client(silence_timeout=1.5) as client:
        streaming = asyncio.Event()
        task = asyncio.create_task(client.chat(ask("long answer"), sampling=GREEDY,
                                               on_text=lambda _: streaming.set()))
        await streaming.wait()  # mid-answer
        router.kill()
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(task, 10)
    assert "no answer from the router" in str(info.value)


async def test_an_answer_streaming_through_a_router_restart_goes_on_unbroken(cluster: Cluster):
    router = cluster.router()
    cluster.worker("w1", "--sim-gen-tps", "20", "--sim-reply-tokens", "40")
    await cluster.wait_workers(1)
    sampling = Sampling(temperature=0, max_tokens=40)
    async with cluster.client(silence_timeout=1.5) as client:
        undisturbed = await client.chat(ask("tell me a long story"), sampling=sampling)
        pieces: list[str] = []
        task = asyncio.create_task(client.chat(ask("tell me a long story"), sampling=sampling,
                                               on_text=pieces.append))
        while len(pieces) < 3:
            await asyncio.sleep(0.05)
        router.kill()
        cluster.router(name="router2")  # the worker registers again by itself
        reply = await asyncio.wait_for(task, 60)
    # After the silence the client asked the new router for the rest, after the tokens it
    # had: one stream, nothing lost or repeated, the same text as without the restart.
    assert reply.text == undisturbed.text == "".join(pieces)
    assert reply.done.failovers == 1
    assert reply.usage.completion_tokens == undisturbed.usage.completion_tokens == 40
    assert reply.usage.prompt_tokens == undisturbed.usage.prompt_tokens


async def test_a_request_to_a_router_just_started_waits_for_its_workers(cluster: Cluster):
    cluster.router()  # --startup-grace: 10 s by default
    async with cluster.client(silence_timeout=5) as client:
        task = asyncio.create_task(client.chat(ask("early bird"), sampling=GREEDY))
        await asyncio.sleep(0.5)
        assert not task.done()  # waiting, not refused with no_workers
        cluster.worker("w1")
        reply = await asyncio.wait_for(task, 30)
    assert reply.text and reply.worker == "w1"


async def test_malformed_frames_do_not_stop_the_router(cluster: Cluster):
    router = cluster.router()
    cluster.worker("w1")
    await cluster.wait_workers(1)
    ctx = zmq.Context()
    try:
        for endpoint in (cluster.client_endpoint, cluster.worker_endpoint):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)  # deliver everything before closing
            sock.connect(endpoint)
            for frames in ([b""], [b"x"] * 7, [b"PICHAT1", b"\x03", b"\xff" * 100],
                           [b"PICHAT1", b"\x04", b"\x80"], [os.urandom(64)],
                           [b"PICHAT1", b"\x01", b"\x81\xa6worker\x01"]):
                sock.send_multipart(frames)
            sock.close()
    finally:
        ctx.term()
    async with cluster.client() as client:
        reply = await client.chat(ask("still serving?"), sampling=GREEDY)
    assert reply.text and router.alive()
    assert "bad message" in router.output()


async def test_killing_a_client_frees_the_workers_slot(cluster: Cluster):
    cluster.router()
    cluster.worker("w1", "--sim-gen-tps", "2", "--sim-reply-tokens", "1000")
    await cluster.wait_workers(1)
    asker = cluster.spawn("ask", ["ask", "--router", cluster.client_endpoint, "tell me a story"])
    async with cluster.client() as client:
        for _ in range(100):
            if (await client.status())["workers"][0]["busy"]:
                break
            await asyncio.sleep(0.05)
        asker.kill()
        for _ in range(100):
            status = await client.status()
            if not status["workers"][0]["busy"]:
                break
            await asyncio.sleep(0.05)
    assert status["workers"][0]["busy"] == 0
    assert status["requests"]["client_gone"] == 1


async def test_send_prompt_script_and_status_command(cluster: Cluster):
    cluster.router()
    cluster.worker("w1", "--sim-reply-tokens", "7")
    await cluster.wait_workers(1)
    env = {**os.environ, "PICHAT_ROUTER": cluster.client_endpoint}
    run = lambda *argv: subprocess.run(argv, env=env, cwd=ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=60)
    out = run("scripts/send_prompt.sh", "Hello, how are you?", "--stats", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 7
    assert "[w1: TTFT" in out.stderr
    table = run(sys.executable, "-m", "pichat", "status")
    assert table.returncode == 0 and "w1" in table.stdout and "1/1" not in table.stdout
    assert "simulated" in table.stdout
    raw = json.loads(run(sys.executable, "-m", "pichat", "status", "--json").stdout)
    assert raw["workers"][0]["name"] == "w1" and raw["requests"]["completed"] == 1


async def test_busy_cluster_answers_busy_instead_of_waiting_forever(cluster: Cluster):
    cluster.router("--queue-limit", "1")
    cluster.worker("w1", "--sim-gen-tps", "5", "--sim-reply-tokens", "50")
    await cluster.wait_workers(1)
    async with cluster.client() as client:
        tasks = [asyncio.create_task(client.chat(ask(f"q{i}"), sampling=GREEDY)) for i in range(3)]
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
        failures = [t.exception() for t in done if t.exception()]
        assert len(failures) == 1 and isinstance(failures[0], RequestFailed)
        assert failures[0].code is ErrorCode.BUSY
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def start_up(cluster: Cluster, *args: str) -> Proc:
    """`pichat up` on port 0; the cluster's client endpoint is the one it reports."""
    up = cluster.spawn("up", ["up", "--backend", "sim", "--clients-bind", "tcp://127.0.0.1:0",
                              "--workers-bind", "tcp://127.0.0.1:0", *args])
    out = await up.wait_output("workers ready behind", timeout=60)
    match = re.search(r"ready behind (tcp://\S+?)[;.]? ", out)
    assert match, out
    cluster.client_endpoint = match.group(1)
    return up


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_up_starts_a_cluster_and_a_signal_stops_all_of_it(cluster: Cluster, signum):
    up = await start_up(cluster, "--workers", "2", "--http", "off")
    await cluster.wait_workers(2, timeout=60)
    children = _children(up.pid)
    assert len(children) == 3  # router + 2 workers
    up.signal(signum)
    assert up.popen.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(_alive(p) for p in children), up.output()


async def test_up_starts_a_dead_worker_again_and_status_counts_it(cluster: Cluster, tmp_path):
    keys = tmp_path / "keys"
    keygen(keys)
    up = await start_up(cluster, "--workers", "2", "--http", "127.0.0.1:0", "--keys", str(keys))
    # The chat page's link carries the API key, in the fragment only.
    api_key = (keys / "api-keys").read_text().split()[-1]
    assert re.search(rf"web chat at http://127\.0\.0\.1:\d+/#key={api_key}", up.output())
    cluster.keys = keys
    status = await cluster.wait_workers(2, timeout=60)
    victim = status["workers"][0]["name"]
    # Each worker has a key pair of its own, named after it: no worker can speak as
    # another nor announce the sessions leased to it.
    names = sorted(w["name"] for w in status["workers"])
    assert all((keys / "workers" / f"{n}.key").is_file() for n in names)
    for pid in _children(up.pid):
        line = _cmdline(pid)
        if " worker " in line:
            name = line.split("--name ", 1)[1].split()[0]
            assert f"--key-name {name} " in line, line
    os.kill(next(p for p in _children(up.pid) if f"--name {victim} " in _cmdline(p)),
            signal.SIGKILL)
    await up.wait_output("starting it again", timeout=30)
    for _ in range(300):
        status = await cluster.wait_workers(2, timeout=60)
        restarts = {w["name"]: w["restarts"] for w in status["workers"]}
        if restarts.get(victim) == 1:
            break
        await asyncio.sleep(0.1)
    assert restarts == {w: int(w == victim) for w in restarts}, restarts
    assert up.alive()  # one worker's death does not stop the cluster
    up.signal(signal.SIGTERM)
    assert up.popen.wait(60) == 0


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_up_once_answers_the_prompt_and_exits(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pichat", "up", "--workers", "1", "--backend", "sim",
         "--http", "off", "--clients-bind", "tcp://127.0.0.1:0", "--workers-bind",
         "tcp://127.0.0.1:0", "--prompt", "Hello", "--once"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "> Hello" in out.stdout and "TTFT" in out.stdout


async def test_chat_keeps_one_session_across_turns(cluster: Cluster):
    cluster.router()
    cluster.worker("w1", "--sim-reply-tokens", "6")
    cluster.worker("w2", "--sim-reply-tokens", "6")
    await cluster.wait_workers(2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pichat", "chat", "--router", cluster.client_endpoint,
        "--temperature", "0", cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(
        proc.communicate(b"my name is Ada\nwhat is my name\n/new\nhello again\n/quit\n"), 60)
    assert proc.returncode == 0, err.decode()
    stats = [line for line in err.decode().splitlines() if "TTFT" in line]
    assert len(stats) == 3, err.decode()
    workers = [line.split(":")[0].strip("[") for line in stats]
    cached = [int(line.split("(")[1].split()[0]) for line in stats]
    assert workers[0] == workers[1]          # the second turn went back to the same worker
    assert cached[1] > cached[0]             # and reused the first turn's KV
    assert "new conversation" in err.decode()
    answers = [line.strip("> ") for line in out.decode().splitlines() if line.strip("> ")]
    assert len(answers) == 3 and all(len(a.split()) == 6 for a in answers)


async def test_health_asks_the_process_itself(cluster: Cluster, tmp_path: Path):
    router_health, worker_health = f"ipc://{tmp_path}/r.ipc", f"ipc://{tmp_path}/w.ipc"
    router = cluster.router("--health-bind", router_health)
    cluster.worker("w1", "--health-bind", worker_health)
    await cluster.wait_workers(1)

    async def health(endpoint: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pichat", "health", "--endpoint", endpoint, "--timeout", "2",
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode()

    code, out = await health(router_health)
    assert code == 0 and out.startswith("healthy: role router") and "workers 1" in out, out
    code, out = await health(worker_health)
    assert code == 0 and "role worker" in out and "connected True" in out, out
    router.kill()
    for _ in range(50):  # the worker notices its router is gone within 3 heartbeats
        code, out = await health(worker_health)
        if code:
            break
        await asyncio.sleep(0.1)
    assert code == 1 and out.startswith("unhealthy") and "connected False" in out
    code, out = await health(f"ipc://{tmp_path}/nobody.ipc")
    assert code == 1 and "no answer" in out


@pytest.mark.slow
async def test_a_batched_worker_serves_four_conversations_at_once_with_the_default_model(
        cluster: Cluster, default_model: Path):
    """One worker, one context, four slots decoded together: four concurrent chats that
    share a system prompt all answer correctly; the prompt is read once; a returning
    conversation reuses its whole history; status explains the KV sizing."""
    cluster.router()
    cluster.worker("qwen", "--ctx", "1024", "--slots", "4", "--threads", "2", backend="llama")
    await cluster.wait_workers(1, timeout=120)
    system = ChatMessage("system", "You are a quiz master for a school. Answer in one short "
                                   "sentence, plainly, and never add anything else.")
    questions = {"a": ("What is the capital of France?", "Paris"),
                 "b": ("What is 2 + 2?", "4"),
                 "c": ("How do you say hello in Spanish?", "Hola"),
                 "d": ("What is the capital of Italy?", "Rome")}
    sampling = Sampling(temperature=0, max_tokens=40)
    async with cluster.client(silence_timeout=30) as client:
        first = await client.chat([system, ChatMessage("user", questions["a"][0])],
                                  session="a", sampling=sampling)
        rest = await asyncio.gather(*[
            client.chat([system, ChatMessage("user", q)], session=s, sampling=sampling)
            for s, (q, _) in questions.items() if s != "a"])
        replies = dict(zip("abcd", [first, *rest]))
        for session, (_, answer) in questions.items():
            assert answer.lower() in replies[session].text.lower(), replies[session].text
            assert replies[session].finish == "stop"
        # The system prompt (and the template around it) was read once, for "a".
        assert first.usage.cached_tokens == 0
        assert all(r.usage.cached_tokens >= 30 for r in rest), [r.usage for r in rest]
        history = [system, ChatMessage("user", questions["a"][0]),
                   ChatMessage("assistant", first.text),
                   ChatMessage("user", "What is the capital of Spain?")]
        again = await client.chat(history, session="a", sampling=sampling)
        assert "Madrid" in again.text
        held = first.usage.prompt_tokens + first.usage.completion_tokens
        assert again.usage.cached_tokens == held, (again.usage, held)
        status = await client.status()
    memory = status["workers"][0]["memory"]
    assert (memory["engine"], memory["kv_type"], memory["kv_tokens"]) == ("batched", "f16", 4096)
    assert memory["kv_kb_per_token"] == 12.0 and memory["kv_mb"] == 48.0
    table = subprocess.run([sys.executable, "-m", "pichat", "status", "--router",
                            cluster.client_endpoint], capture_output=True, text=True, timeout=60)
    assert re.search(r"\d+/4096\s+48 f16\s+\d+/256", table.stdout), table.stdout
