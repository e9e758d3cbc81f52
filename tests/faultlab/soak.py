"""Soak: many concurrent clients (each its own ZeroMQ connection) against a router and
simulated workers for minutes, with random worker kills and restarts. Reports requests
sent / completed / failed / lost / corrupted and the router's memory over time: its RSS,
and its Python heap (allocated blocks). The RSS also holds libzmq's per-connection queues,
which grow until each connection has carried ~512 messages each way and are flat from then
on (`python bench/run.py connections`); the Python heap holds the router's own state.

    python tests/faultlab/soak.py --clients 1000 --minutes 3     (make soak)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from pichat.client import Client  # noqa: E402
from pichat.config import ClientConfig, SimConfig  # noqa: E402
from pichat.errors import PichatError, ProtocolError  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402
from pichat.worker.engine.sim import SimModel  # noqa: E402
from pichat.worker.engine.textstream import TextStream  # noqa: E402

REPLY = 12
SAMPLING = Sampling(temperature=0, max_tokens=50)
MODEL = SimModel(SimConfig(prompt_tps=1e9, gen_tps=1e9, reply_tokens=REPLY), 4096)


def expected(messages) -> str:
    out = TextStream(lambda *_: None)
    MODEL.new_context(1).generate(MODEL.chat_tokens(messages), SAMPLING, out, threading.Event())
    out.close()
    return out.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pichat(*argv: str, log) -> subprocess.Popen:
    env = {**os.environ, "PICHAT_KEYS": "off", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pichat", *argv], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def soak(clients: int, seconds: float, workers: int, restart_every: float,
               log_path: Path) -> dict:
    cport, wport = free_port(), free_port()
    log = open(log_path, "ab")
    router = pichat("router", "--clients-bind", f"tcp://127.0.0.1:{cport}", "--workers-bind",
                    f"tcp://127.0.0.1:{wport}", "--http", "off", "--queue-limit", "4096",
                    # Small enough that the router's bounded memory (sessions, prefixes)
                    # fills in the first minute: after that its memory must stay flat.
                    "--max-sessions", "5000", "--log-level", "warning", log=log)

    def start_worker(i: int) -> subprocess.Popen:
        return pichat("worker", "--router", f"tcp://127.0.0.1:{wport}", "--name", f"w{i}",
                      "--backend", "sim", "--slots", "16", "--sim-gen-tps", "100",
                      "--sim-reply-tokens", str(REPLY), "--log-level", "warning", log=log)

    procs = {i: start_worker(i) for i in range(workers)}
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    memory: list[tuple[float, float]] = []
    objects: list[tuple[float, int]] = []
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, clients + 64)
    config = ClientConfig(router=f"tcp://127.0.0.1:{cport}", silence_timeout=10)
    try:
        async with Client(config, context=ctx) as probe:
            await probe.wait_for_workers(workers)
        start = time.monotonic()
        stop_at = start + seconds

        async def user(i: int) -> None:
            rng = random.Random(i)
            async with Client(config, context=ctx) as client:
                n = 0
                while time.monotonic() < stop_at:
                    await asyncio.sleep(rng.uniform(0.5, 6.0))  # reading, thinking, typing
                    n += 1
                    messages = [ChatMessage("user", f"user {i} asks question {n}")]
                    counts["sent"] += 1
                    try:
                        reply = await asyncio.wait_for(client.chat(messages, sampling=SAMPLING),
                                                       120)
                    except TimeoutError:
                        counts["lost"] += 1
                        continue
                    except ProtocolError:
                        counts["corrupted"] += 1
                        continue
                    except PichatError as exc:
                        counts["failed"] += 1
                        errors[exc.code.value] += 1
                        continue
                    ok = reply.text == expected(messages)
                    counts["completed" if ok else "corrupted"] += 1
                    counts["failovers"] += reply.done.failovers

        async def chaos() -> None:
            rng = random.Random(7)
            while True:
                await asyncio.sleep(restart_every)
                i = rng.randrange(workers)
                how = rng.choice([signal.SIGKILL, signal.SIGTERM])
                procs[i].send_signal(how)
                await asyncio.get_running_loop().run_in_executor(None, procs[i].wait)
                counts[f"restarts_{signal.Signals(how).name}"] += 1
                procs[i] = start_worker(i)

        async def sample() -> None:
            async with Client(config, context=ctx) as probe:
                for n in itertools.count():
                    t = time.monotonic() - start
                    memory.append((t, rss_mb(router.pid)))
                    if n % 5 == 0:  # what the router's Python holds, in allocated blocks
                        with contextlib.suppress(PichatError):
                            status = await probe.status()
                            objects.append((t, status["router"]["memory"]["python_blocks"]))
                    await asyncio.sleep(2.0)

        background = [asyncio.create_task(chaos()), asyncio.create_task(sample())]
        await asyncio.gather(*[user(i) for i in range(clients)])
        for task in background:
            task.cancel()
        async with Client(config, context=ctx) as probe:
            requests = (await probe.status())["requests"]
        caches = {k: requests.get(k, 0) for k in ("sessions_remembered", "sessions_forgotten",
                                                   "prefixes_remembered")}
    finally:
        for proc in [router, *procs.values()]:
            proc.kill()
            proc.wait()
        ctx.term()
        log.close()
    return {"counts": counts, "errors": errors, "memory": memory, "objects": objects,
            "caches": caches}


def summary(result: dict, clients: int, seconds: float) -> list[str]:
    c = result["counts"]
    mem = result["memory"]
    third = max(1, len(mem) // 3)
    thirds = [mem[:third], mem[third:-third] or mem[:third], mem[-third:]]
    first, middle, last = (sum(m for _, m in part) / len(part) for part in thirds)
    restarts = sum(v for k, v in c.items() if k.startswith("restarts_"))
    return [
        f"soak: {clients} clients for {seconds:.0f}s, {restarts} worker kills/stops "
        f"({c['restarts_SIGKILL']} SIGKILL, {c['restarts_SIGTERM']} SIGTERM)",
        f"requests: sent {c['sent']}, completed {c['completed']}, failed {c['failed']} "
        f"{dict(result['errors'])}, lost {c['lost']}, corrupted {c['corrupted']}, "
        f"failovers {c['failovers']}",
        f"router memory (RSS, mean per third of the run): {first:.1f} / {middle:.1f} / "
        f"{last:.1f} MB, max {max(m for _, m in mem):.1f} MB ({len(mem)} samples); "
        f"router caches at the end: {result['caches']}",
        "router memory by minute (MB): " + ", ".join(
            f"{m:.0f}" for m in by_minute(mem)),
        "router Python heap by minute (thousands of allocated blocks): " + ", ".join(
            f"{b / 1000:.0f}" for b in by_minute(result["objects"])),
    ]


def by_minute(series: list[tuple[float, float]]) -> list[float]:
    """The first sample of each minute after the start, and the last one."""
    picked: dict[int, float] = {}
    for t, value in series:
        picked.setdefault(int(t // 60), value)
    values = [v for minute, v in sorted(picked.items()) if minute > 0]
    if series:
        values.append(series[-1][1])
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--restart-every", type=float, default=15.0)
    args = parser.parse_args()
    seconds = args.minutes * 60
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)),
                                                hard))
    result = asyncio.run(soak(args.clients, seconds, args.workers, args.restart_every,
                              Path("/tmp/pichat-soak.log")))
    print("\n".join(summary(result, args.clients, seconds)))
