"""One worker, many conversations: the batched engine against one context per slot and
against llama.cpp's own server, side by side on the same cores.

1. Streams: 1, 2 and 4 concurrent streams (128 tokens each, greedy; the median of 3
   rounds) through the OpenAI API, on a pichat worker with `--engine batched` (1 slot and
   4 slots), one with `--engine contexts` (4 slots, the former design) and
   `llama-server --parallel 4` (built from the llama.cpp source the llama-cpp-python sdist
   vendors, scripts/build-peers.sh), all with 2 threads and 4,096 tokens per slot; plus
   raw llama-cpp-python in-process for a lone stream, and llama-batched-bench (llama.cpp
   alone). Aggregate tokens/s, a lone stream's decode speed, each server's resident memory.
2. Chat: 4 users x 8 turns through the OpenAI API (streaming, the whole history each
   turn, as Open WebUI sends it): pichat with one worker of 4 slots and with two workers of
   2 slots, against llama-server --parallel 4. Wall time and time to first token per turn.
3. Memory per warm conversation with `--kv-type f16` and `q8_0`: conversations parked in
   the worker's session store, their bytes per token and per conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import aiohttp  # noqa: E402
import openai  # noqa: E402
from http_affinity import FOLLOW_UPS, OPENERS, SYSTEM  # noqa: E402

from common import cluster_and_client, p50, rss_mb  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "a lost city under the sea",
          "a journey across the desert"]
THREADS = 2
CTX = 4096
LOG = "/tmp/pichat-bench-llama-server.log"


def build_peers() -> Path | None:
    """The directory with llama-server (built once, ~10 min on 2 cores), or None."""
    done = subprocess.run([str(ROOT / "scripts" / "build-peers.sh"), sys.executable],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"(llama-server could not be built: {done.stderr.strip()[-300:]})")
        return None
    return Path(done.stdout.strip().splitlines()[-1])


@asynccontextmanager
async def llama_server(peers: Path, model: str, parallel: int,
                       threads: int = THREADS) -> AsyncIterator[tuple[str, int]]:
    """llama-server on a port it picks; yields (base URL, pid) once /health says ready."""
    proc = await asyncio.create_subprocess_exec(
        str(peers / "llama-server"), "-m", model, "-c", str(CTX * parallel),
        "--parallel", str(parallel), "-t", str(threads), "--host", "127.0.0.1", "--port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        url = None
        assert proc.stderr is not None
        while url is None:
            line = await proc.stderr.readline()
            if not line:
                raise RuntimeError("llama-server exited before listening")
            if m := re.search(rb"listening on (http://[\d.]+:\d+)", line):
                url = m.group(1).decode()
        drain = asyncio.create_task(_drain(proc.stderr))
        async with aiohttp.ClientSession() as http:
            while True:  # 503 while the model loads
                async with http.get(f"{url}/health") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
        yield url, proc.pid
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep llama-server's log (its last lines explain a crash)."""
    with open(LOG, "ab") as log:
        while line := await stream.readline():
            log.write(line)


@asynccontextmanager
async def pichat(workers: int, slots: int, threads: int, engine: str = "batched",
                 kv_type: str = "f16", cache_mb: int = 256,
                 ) -> AsyncIterator[tuple[str, list[int], object]]:
    """A pichat cluster; yields (OpenAI base URL, worker pids, native client)."""
    async with cluster_and_client(
            workers=workers, backend="llama", model="default", slots=slots, threads=threads,
            ctx=CTX, http="127.0.0.1:0",
            worker_args=("--engine", engine, "--kv-type", kv_type,
                         "--cache-mb", str(cache_mb))) as (cluster, client):
        base = (await client.status())["router"]["http"]
        yield base, [w.proc.pid for w in cluster.workers], client


async def one_stream(api, prompt: str, max_tokens: int) -> tuple[int, float, float, float]:
    """(completion tokens, start, first token, end) of one streamed answer."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await api.chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return tokens, start, first or start, time.perf_counter()


async def streams(base: str, n: int, max_tokens: int, repeat: int = 3) -> tuple[float, float]:
    """(aggregate tokens/s of n concurrent streams, decode tokens/s of the first stream),
    each the median of `repeat` rounds (this VM's speed wanders by several percent)."""
    aggregate, lone = [], []
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=2,
                                  timeout=600) as api:
        await one_stream(api, "Say hello.", 8)  # warm up
        for _ in range(repeat):
            rows = await asyncio.gather(*[
                one_stream(api, f"Write a long story about {TOPICS[i % len(TOPICS)]}.",
                           max_tokens) for i in range(n)])
            wall = max(r[3] for r in rows) - min(r[1] for r in rows)
            aggregate.append(sum(r[0] for r in rows) / wall)
            lone.append(rows[0][0] / max(1e-9, rows[0][3] - rows[0][2]))
    return statistics.median(aggregate), statistics.median(lone)


def raw_llama_cpp(model: str, max_tokens: int) -> float:
    """Decode tokens/s of raw llama-cpp-python (in a fresh process), one stream."""
    code = f"""
import json, time, llama_cpp
llm = llama_cpp.Llama({model!r}, n_ctx={CTX}, n_threads={THREADS}, n_threads_batch={THREADS},
                      verbose=False)
def run(prompt, n):
    first = None; count = 0
    for chunk in llm.create_chat_completion([{{"role": "user", "content": prompt}}],
                                            temperature=0, max_tokens=n, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            first = first or time.perf_counter()
    return count / (time.perf_counter() - first)
run("Say hello.", 8)
print(json.dumps(run("Write a long story about {TOPICS[0]}.", {max_tokens})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def batched_bench(peers: Path, model: str, max_tokens: int) -> dict[int, float]:
    """llama.cpp's own batched decoding speed (S_TG, tokens/s) by number of sequences."""
    done = subprocess.run(
        [str(peers / "llama-batched-bench"), "-m", model, "-c", str(CTX * 4), "-b", "512",
         "-ub", "512", "-npp", "32", "-ntg", str(max_tokens), "-npl", "1,2,4",
         "-t", str(THREADS)], capture_output=True, text=True, check=True)
    speeds = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2].isdigit():
            speeds[int(cells[2])] = float(cells[7])
    return speeds


async def part_streams(model: str, peers: Path | None, max_tokens: int) -> list[str]:
    results: dict[str, dict[int, tuple[float, float]]] = {}
    memory: dict[str, float] = {}
    counts = (1, 2, 4)
    for label, slots, engine in (("pichat batched, 1 slot", 1, "batched"),
                                 ("pichat batched, 4 slots", 4, "batched"),
                                 ("pichat contexts, 4 slots", 4, "contexts")):
        async with pichat(1, slots, THREADS, engine) as (base, pids, _):
            results[label] = {n: await streams(base, n, max_tokens)
                              for n in counts if n <= slots}
            memory[label] = rss_mb(pids[0])
    if peers is not None:
        async with llama_server(peers, model, 4) as (base, pid):
            results["llama-server --parallel 4"] = {n: await streams(base, n, max_tokens)
                                                    for n in counts}
            memory["llama-server --parallel 4"] = rss_mb(pid)
    raw = await asyncio.to_thread(raw_llama_cpp, model, max_tokens)
    ceiling = await asyncio.to_thread(batched_bench, peers, model, max_tokens) if peers else {}
    lines = [f"aggregate tokens/s ({max_tokens} tokens per stream, {THREADS} threads; "
             "lone stream decode tokens/s; resident MB)",
             f"{'':28} {'1 stream':>9} {'2 streams':>10} {'4 streams':>10} {'lone':>7} "
             f"{'RSS MB':>7}"]
    for label, row in results.items():
        cells = [f"{row[n][0]:9.1f}" if n in row else f"{'-':>9}" for n in counts]
        lines.append(f"{label:28} {cells[0]} {cells[1]:>10} {cells[2]:>10} "
                     f"{row[1][1]:7.1f} {memory[label]:7.0f}")
    lines.append(f"{'raw llama-cpp-python':28} {'':9} {'':10} {'':10} {raw:7.1f}")
    one, four = results["pichat batched, 1 slot"], results["pichat batched, 4 slots"]
    ctxs = results["pichat contexts, 4 slots"]
    ram_one = memory["pichat batched, 1 slot"]
    lines += [
        f"4-slot RAM / 1-slot RAM: batched {memory['pichat batched, 4 slots'] / ram_one:.2f}x"
        f" (target <= 1.5), contexts {memory['pichat contexts, 4 slots'] / ram_one:.2f}x",
        f"lone stream on 4 slots / on 1 slot: batched {four[1][1] / one[1][1]:.2f}"
        f" (target >= 0.9), contexts {ctxs[1][1] / one[1][1]:.2f}",
        f"lone stream, batched 4 slots / raw llama-cpp-python: {four[1][1] / raw:.2f}"
        " (target >= 0.95)",
        f"4 streams / 1 stream, batched 4 slots: {four[4][0] / four[1][0]:.2f} (target >= 1.3);"
        f" contexts {ctxs[4][0] / ctxs[1][0]:.2f}",
    ]
    if ceiling:
        lines.append("llama-batched-bench (llama.cpp alone: decode only, no sampling, no "
                     "server), tokens/s at 1/2/4 sequences: "
                     + " / ".join(f"{ceiling[n]:.1f}" for n in counts)
                     + f"; 4 / 1 = {ceiling[4] / ceiling[1]:.2f}")
    if "llama-server --parallel 4" in results:
        server = results["llama-server --parallel 4"]
        lines.append(f"4 streams, batched / llama-server: {four[4][0] / server[4][0]:.2f}"
                     f" (target >= 1.0); 1 stream: {four[1][0] / server[1][0]:.2f}")
    return lines


async def conversation(api, cid: int, turns: int, max_tokens: int, out) -> None:
    history = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": OPENERS[cid % len(OPENERS)]}]
    for turn in range(turns):
        start = time.perf_counter()
        first, text = None, []
        stream = await api.chat.completions.create(
            model="default", messages=history, temperature=0, max_tokens=max_tokens,
            stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
        out[turn].append((first or time.perf_counter()) - start)
        history += [{"role": "assistant", "content": "".join(text)},
                    {"role": "user", "content": FOLLOW_UPS[(turn + cid) % len(FOLLOW_UPS)]}]


async def chat(base: str, users: int, turns: int, max_tokens: int) -> tuple[dict, float]:
    """Per turn, every user's TTFT; and the wall time. (The client retries a request
    whose pooled connection llama-server's HTTP library closed as it was sent; nothing
    had been answered on it.)"""
    out: dict[int, list[float]] = defaultdict(list)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=2,
                                  timeout=600) as api:
        start = time.perf_counter()
        await asyncio.gather(*[conversation(api, u, turns, max_tokens, out)
                               for u in range(users)])
        return out, time.perf_counter() - start


async def part_chat(model: str, peers: Path | None, users: int, turns: int,
                    max_tokens: int) -> list[str]:
    runs: dict[str, tuple[dict, float]] = {}
    async with pichat(1, 4, THREADS) as (base, _, _):
        runs["pichat 1 worker x 4 slots"] = await chat(base, users, turns, max_tokens)
    async with pichat(2, 2, 1) as (base, _, _):
        runs["pichat 2 workers x 2 slots"] = await chat(base, users, turns, max_tokens)
    if peers is not None:
        async with llama_server(peers, model, 4) as (base, _):
            runs["llama-server --parallel 4"] = await chat(base, users, turns, max_tokens)
    lines = [f"{users} users x {turns} turns, {max_tokens} tokens per answer: wall s, "
             "TTFT p50 ms turn 1 / turns 2-8"]
    for label, (out, wall) in runs.items():
        later = [t for turn in range(1, turns) for t in out[turn]]
        lines.append(f"{label:28} wall {wall:6.1f}   TTFT {p50(out[0]) * 1000:6.0f} / "
                     f"{p50(later) * 1000:6.0f}")
    if "llama-server --parallel 4" in runs:
        server_out, server_wall = runs["llama-server --parallel 4"]
        server_later = p50([t for turn in range(1, turns) for t in server_out[turn]])
        for label in ("pichat 1 worker x 4 slots", "pichat 2 workers x 2 slots"):
            out, wall = runs[label]
            later = p50([t for turn in range(1, turns) for t in out[turn]])
            lines.append(f"{label} / llama-server: wall {wall / server_wall:.2f}, "
                         f"TTFT turns 2-{turns} {later / server_later:.2f} (targets < 1)")
    return lines


async def part_memory(conversations: int) -> list[str]:
    lines = [f"{conversations} conversations of ~600 tokens parked in the session store "
             "(1 slot): KB per token, MB per conversation, worker RSS growth"]
    per_token: dict[str, float] = {}
    for kv_type in ("f16", "q8_0"):
        async with pichat(1, 1, THREADS, kv_type=kv_type, cache_mb=2048) as (_, pids, client):
            before = rss_mb(pids[0])
            tokens = 0
            for c in range(conversations):
                text = " ".join(f"Item {c}.{i}: a note about topic {c}, part {i}."
                                for i in range(40))
                reply = await client.chat([ChatMessage("user", text)], session=f"m{c}",
                                          sampling=Sampling(temperature=0, max_tokens=4))
                tokens += reply.usage.prompt_tokens + reply.usage.completion_tokens
            await client.chat([ChatMessage("user", "hi")], session="last",
                              sampling=Sampling(temperature=0, max_tokens=1))
            worker = await _heartbeat_with_store(client, conversations)
            grown = rss_mb(pids[0]) - before
            store = worker["memory"]["store_mb"]
            per_token[kv_type] = store * 1024 / tokens
            lines.append(f"--kv-type {kv_type:5} {per_token[kv_type]:6.1f} KB/token  "
                         f"{store / conversations:5.1f} MB/conversation  RSS +{grown:.0f} MB  "
                         f"(status: {worker['memory']['kv_kb_per_token']} KB/token)")
    lines.append(f"conversations per GB, q8_0 / f16: {per_token['f16'] / per_token['q8_0']:.2f}")
    return lines


async def _heartbeat_with_store(client, conversations: int) -> dict:
    """The worker's status once a heartbeat has reported every parked conversation."""
    while True:
        worker = (await client.status())["workers"][0]
        if worker["warm_sessions"] >= conversations + 1:
            return worker
        await asyncio.sleep(0.2)


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--parts", default="streams,chat,memory")
    args = parser.parse_args(argv)
    from pichat.models import resolve

    model = str(resolve("default")[0])
    peers = await asyncio.to_thread(build_peers)
    lines: list[str] = []
    parts = args.parts.split(",")
    if "streams" in parts:
        lines += await part_streams(model, peers, args.max_tokens) + [""]
    if "chat" in parts:
        lines += await part_chat(model, peers, args.users, args.turns, args.chat_tokens) + [""]
    if "memory" in parts:
        lines += await part_memory(args.conversations)
    return lines


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
