"""What the router costs: the same model called directly in one process vs through the
router and a worker process (TTFT and generation speed), and how many streamed tokens
per second the router can forward (simulated workers, so the model is not the limit)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import local_cluster, p50  # noqa: E402
from pichat.models import resolve  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402
from pichat.worker.engine.llama import LlamaModel  # noqa: E402
from pichat.worker.engine.textstream import TextStream  # noqa: E402

PROMPTS = [f"Write one sentence about the number {i}." for i in range(6)]
SAMPLING = Sampling(temperature=0, max_tokens=64)


def direct(model_spec: str, threads: int) -> list[tuple[float, float]]:
    """(TTFT s, tokens/s) per prompt, calling the backend in this process."""
    path, name = resolve(model_spec)
    model = LlamaModel(path, n_ctx=4096, name=name, threads=threads)
    ctx = model.new_context(threads)
    out = []
    for prompt in PROMPTS:
        first: list[float] = []
        stream = TextStream(lambda *_, first=first: first.append(time.perf_counter()))
        start = time.perf_counter()
        result = ctx.generate(model.chat_tokens([ChatMessage("user", prompt)]), SAMPLING, stream,
                              threading.Event())
        stream.close()
        end = time.perf_counter()
        out.append((first[0] - start, (result.completion_tokens - 1) / (end - first[0])))
    model.close()
    return out


async def routed(model_spec: str, threads: int) -> list[tuple[float, float]]:
    out = []
    async with local_cluster(workers=1, backend="llama", model=model_spec, slots=1,
                             threads=threads) as client:
        for prompt in PROMPTS:
            reply = await client.chat([ChatMessage("user", prompt)], sampling=SAMPLING)
            gen = reply.elapsed - reply.ttft
            out.append((reply.ttft, (reply.usage.completion_tokens - 1) / gen))
    return out


async def forwarding(workers: int, clients: int, seconds: float) -> tuple[float, int]:
    """Tokens/s the router forwards from fast simulated workers to concurrent clients."""
    async with local_cluster(workers=workers, backend="sim", slots=4,
                             worker_args=("--sim-gen-tps", "20000", "--sim-prompt-tps", "1e6",
                                       "--sim-reply-tokens", "2000")) as client:
        tokens = 0
        stop = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            nonlocal tokens
            while time.perf_counter() < stop:
                reply = await client.chat([ChatMessage("user", f"go {i}")],
                                          sampling=Sampling(temperature=0, max_tokens=2000))
                tokens += reply.usage.completion_tokens

        start = time.perf_counter()
        await asyncio.gather(*[loop(i) for i in range(clients)])
        return tokens / (time.perf_counter() - start), tokens


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    d = direct(args.model, args.threads)
    r = await routed(args.model, args.threads)
    # The first call of each warms caches (page cache, template): report the rest.
    dt, rt = p50([x[0] for x in d[1:]]), p50([x[0] for x in r[1:]])
    ds, rs = p50([x[1] for x in d[1:]]), p50([x[1] for x in r[1:]])
    rate, total = await forwarding(workers=4, clients=16, seconds=5.0)
    return [
        "               direct      via router   ratio",
        f"TTFT p50       {dt * 1000:6.0f} ms   {rt * 1000:6.0f} ms    {rt / dt:5.2f}  "
        f"(router: {(rt - dt) * 1000:+.1f} ms)",
        f"tokens/s p50   {ds:9.1f}   {rs:9.1f}      {rs / ds:5.2f}",
        f"router forwarding: {rate:,.0f} tokens/s streamed to 16 clients from 4 simulated "
        f"workers ({total:,} tokens)",
    ]


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
