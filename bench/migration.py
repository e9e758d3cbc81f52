"""A conversation that changes worker: its KV state moved, against it read again.

Two workers on the default model (1 slot, 1 thread each). A conversation with a history
of about 500, 1,000 and 2,000 tokens has its first turn on one worker, and its next turn
is placed on the other (the two workers serve one GGUF file under two names, and the turn
asks for the second name: a move the router cannot avoid, the same as a spill or a drain).
With `--migration off` the second worker reads the whole history; with `auto` the router
moves the state first. We measure the next turn's time to first token (client side), the
tokens it found cached, the bytes moved per token and the transfer time; and from those,
project the same for a Raspberry Pi 5 running a 3B model on gigabit Ethernet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from pichat.client import Client
from pichat.config import ClientConfig
from pichat.protocol import ChatMessage, Sampling

SAMPLING = Sampling(temperature=0, max_tokens=16)

# The projection's assumptions (docs/benchmarks.md).
PI_PROMPT_TPS = 15.0
"""A Pi 5 reading a prompt with a 3B Q4 model (the issue's figure)."""
PI_KV_BYTES_PER_TOKEN = 112 * 1024
"""Llama 3.2 3B, f16 KV: 28 layers x 8 KV heads x (128 + 128) x 2 bytes."""
GIGABIT_BPS = 100e6
"""What one gigabit link carries in practice, bytes per second (two hops: through the
router's link in and out, which are separate directions of a full-duplex port)."""


def history(tokens: int) -> str:
    """About `tokens` tokens of notes, different for each size (no prefix in common)."""
    return " ".join(f"Note {i} of list {tokens}: shelf {i % 7} holds {i % 13} boxes."
                    for i in range(tokens // 19))


@asynccontextmanager
async def two_workers(mode: str, models: list[str]) -> AsyncIterator[Client]:
    """A router (`--migration mode`) and one worker per model, as processes."""
    tmp = Path(tempfile.mkdtemp(prefix="pichat-bench-"))
    ready = tmp / "router.ready"
    pichat = [sys.executable, "-m", "pichat"]
    procs = [subprocess.Popen([*pichat, "router", "--clients-bind", "tcp://127.0.0.1:0",
                               "--workers-bind", "tcp://127.0.0.1:0", "--http", "off",
                               "--migration", mode, "--log-level", "warning", "--keys", "off",
                               "--ready-file", str(ready)])]
    try:
        while not ready.exists():
            if procs[0].poll() is not None:
                raise RuntimeError("the router exited")
            await asyncio.sleep(0.05)
        bound = json.loads(ready.read_text())
        for i, model in enumerate(models):
            procs.append(subprocess.Popen([
                *pichat, "worker", "--router", bound["workers"], "--name", f"w{i + 1}",
                "--model", model, "--slots", "1", "--threads", "1", "--ctx", "4096",
                "--log-level", "warning", "--keys", "off"]))
        async with Client(ClientConfig(router=bound["clients"], silence_timeout=120)) as c:
            await c.wait_for_workers(len(models), timeout=300)
            yield c
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


async def run(mode: str, sizes: list[int], models: list[str]) -> dict[int, dict]:
    results: dict[int, dict] = {}
    async with two_workers(mode, models) as client:
        for size in sizes:
            session = f"{mode}-{size}"
            turn1 = [ChatMessage("user", history(size) + "\nHow many notes are there?")]
            first = await client.chat(turn1, session=session, sampling=SAMPLING,
                                      model="left")
            before = (await client.status())["requests"]
            turn2 = [*turn1, ChatMessage("assistant", first.text),
                     ChatMessage("user", "Which room holds the most boxes?")]
            second = await client.chat(turn2, session=session, sampling=SAMPLING,
                                       model="right")
            after = (await client.status())["requests"]
            delta = {k: after.get(k, 0) - before.get(k, 0)
                     for k in ("state_bytes_moved", "state_tokens_moved", "state_move_ms")}
            results[size] = {
                "history": first.usage.prompt_tokens + first.usage.completion_tokens,
                "ttft": second.ttft, "cached": second.usage.cached_tokens,
                "bytes": delta["state_bytes_moved"], "tokens": delta["state_tokens_moved"],
                "move_ms": delta["state_move_ms"], "workers": (first.worker, second.worker),
            }
    return results


def two_names() -> list[str]:
    """The default model's file under two names (symbolic links): two workers that serve
    one model but that a request can tell apart."""
    from pichat.models import resolve

    model = resolve("default")[0]
    tmp = Path(tempfile.mkdtemp(prefix="pichat-bench-models-"))
    paths = []
    for name in ("left", "right"):
        path = tmp / f"{name}.gguf"
        os.symlink(model, path)
        paths.append(str(path))
    return paths


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="500,1000,2000")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    models = two_names()
    off = await run("off", sizes, models)
    on = await run("auto", sizes, models)
    lines = ["history   next-turn TTFT ms: read again / moved / ratio   cached (read / moved)"
             "   moved: KB per token, transfer ms"]
    for size in sizes:
        a, b = off[size], on[size]
        per_token = b["bytes"] / b["tokens"] / 1024 if b["tokens"] else float("nan")
        lines.append(f"{a['history']:7}   {a['ttft'] * 1000:8.0f} / {b['ttft'] * 1000:6.0f} / "
                     f"{b['ttft'] / a['ttft']:5.2f}          {a['cached']:5} / {b['cached']:5}"
                     f"        {per_token:6.1f}, {b['move_ms']:5.0f}")
    big = on[sizes[-1]]
    tokens = big["history"]
    recompute = tokens / PI_PROMPT_TPS
    transfer = tokens * PI_KV_BYTES_PER_TOKEN / GIGABIT_BPS
    lines.append(
        f"projected, Pi 5 + Llama 3.2 3B (f16 KV, {PI_KV_BYTES_PER_TOKEN // 1024} KB/token), "
        f"gigabit ({GIGABIT_BPS / 1e6:.0f} MB/s), {tokens} tokens: read again "
        f"{recompute:.0f} s at {PI_PROMPT_TPS:.0f} tokens/s, moved {transfer:.1f} s "
        f"(ratio {transfer / recompute:.3f}; q8_0 KV halves the transfer)")
    return lines


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
