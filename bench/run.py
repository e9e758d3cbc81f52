"""`make bench`: every benchmark, side by side in one run, printed as ratios.

    python bench/run.py               # all
    python bench/run.py affinity      # one (batched | migration | affinity | http | ...)
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import affinity  # noqa: E402
import batched  # noqa: E402
import connections  # noqa: E402
import embeddings  # noqa: E402
import ha  # noqa: E402
import http_affinity  # noqa: E402
import migration  # noqa: E402
import overhead  # noqa: E402
import patterns  # noqa: E402
import proxy  # noqa: E402
import sliding  # noqa: E402
import structured  # noqa: E402

BENCHMARKS = {
    "batched": ("One worker, many conversations: the batched engine vs one context per slot "
                "vs llama-server --parallel 4 (default model, 2 threads)", batched.main),
    "migration": ("A conversation that changes worker: its KV state moved vs read again "
                  "(default model, 2 workers x 1 slot, 1 thread each)", migration.main),
    "proxy": ("8 users x 8 turns through the OpenAI API: pichat (2 workers x 2 slots) vs two "
              "llama-servers behind nginx round-robin, same cores", proxy.main),
    "affinity": ("Session affinity vs round-robin: 4 users x 8 turns, 2 llama workers "
                 "(default model, 1 slot, 1 thread each)", affinity.main),
    "http": ("Stateless OpenAI clients over HTTP: prefix affinity vs round-robin, 8 "
             "conversations sharing a system prompt, 2 workers x 2 slots", http_affinity.main),
    "overhead": ("Router overhead: the default model direct vs through the router; "
                 "router forwarding rate", overhead.main),
    "sliding": ("A 60-turn conversation at --ctx 1024: sliding in blocks with context shift "
                "(and a note) vs dropping the oldest turn every turn and reading again "
                "(default model, 1 worker, 2 threads)", sliding.main),
    "structured": ("What a grammar costs: answers free vs held to a JSON schema or a tool "
                   "call (default model, batched engine, 2 threads, in-process)",
                   structured.main),
    "patterns": ("What a pattern's grammar costs per token: the worst patterns the schema "
                 "check accepts vs those it refuses (default model's vocabulary)",
                 patterns.main),
    "embeddings": ("Embeddings per second for short sentences: many inputs per request vs "
                   "one at a time (default model, 2 threads, in-process)", embeddings.main),
    "ha": ("What two routers cost a kept turn: one router on SQLite vs two on etcd x3, "
           "every worker registered with both (8 conversations x 8 turns, sim workers)",
           ha.main),
    "connections": ("Router memory per client connection, as the messages it carried grow "
                    "(libzmq's pipes; explains the soak's memory curve)", connections.main),
}


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    print(f"pichat benchmarks on {platform.node()} ({os.cpu_count()} CPUs, "
          f"{platform.machine()}, Python {platform.python_version()})")
    for name in chosen:
        title, run = BENCHMARKS[name]
        print(f"\n== {name}: {title}")
        start = time.perf_counter()
        for line in asyncio.run(run([])):
            print(line, flush=True)
        print(f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
