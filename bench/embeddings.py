"""Embeddings per second for short sentences on one worker: one request of many inputs
(several sequences per decode) against one input at a time.

The default model's pooled embeddings, in-process on the worker's embedding context
(2 threads); 64 sentences of 8-12 words. The router adds the same per request to both."""

from __future__ import annotations

import argparse
import asyncio
import time

from pichat.models import resolve
from pichat.worker.engine.llama import LlamaModel

WORDS = ("the cluster answers quickly because each conversation returns to the worker "
         "that holds its cache while other pis wait for work").split()


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 5)) + "."
            for i in range(n)]


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args(argv)
    model = LlamaModel(str(resolve(args.model)[0]), n_ctx=1024, threads=2, lanes=1)
    texts = sentences(args.count)
    try:
        model.embed(texts[:2])  # the embedding context is made at the first call
        rates = {}
        for name, size in (("one at a time", 1), ("16 per request", 16),
                           (f"{args.count} per request", args.count)):
            start = time.perf_counter()
            for i in range(0, len(texts), size):
                model.embed(texts[i:i + size])
            rates[name] = len(texts) / (time.perf_counter() - start)
    finally:
        model.close()
    base = rates["one at a time"]
    return [f"{name:18} {rate:7.1f} embeddings/s  {rate / base:5.2f}x"
            for name, rate in rates.items()]


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
