"""pichat against what a user would otherwise build: one llama.cpp server per machine
behind a round-robin proxy (nginx).

8 users hold 8-turn conversations at once through the OpenAI API (the whole history every
turn, no session id, seeded think time, 32-token greedy answers), on the same cores: two
pichat workers of 2 slots and 1 thread each behind the router, against two `llama-server
--parallel 2 -t 1` behind nginx (`upstream` round-robin, streaming passed through). We
measure the wall time, the time to first token per turn, and the share of prompt tokens
each side served from cache on turns 2-8. The whole is run `--repeat` times, the two sides
taking turns, each run on freshly started servers; the figures are the median wall time
and, over all runs pooled, the last turn's median TTFT and the cached share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import openai  # noqa: E402
from batched import build_peers, llama_server, pichat  # noqa: E402
from http_affinity import conversation  # noqa: E402

NGINX_CONF = """
daemon off;
master_process off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream llama {{ {servers} }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


def _free_port() -> int:
    """A port free now (nginx cannot be told to pick one; it is retried if taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def nginx(upstreams: list[str]) -> AsyncIterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="pichat-nginx-"))
    servers = " ".join(f"server {u.removeprefix('http://')};" for u in upstreams)
    for _ in range(5):
        port = _free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, servers=servers, port=port))
        proc = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                stderr=subprocess.DEVNULL)
        for _ in range(100):  # until it accepts connections (or exits: port taken)
            if proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()[-500:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


async def conversations(base: str, args) -> tuple[dict, float]:
    out: dict[int, list] = defaultdict(list)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=2,
                                  timeout=900) as api:
        start = time.perf_counter()
        await asyncio.gather(*[conversation(api, u, args.turns, args.max_tokens, args.think,
                                            out) for u in range(args.users)])
        return out, time.perf_counter() - start


def _cached(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (getattr(details, "cached_tokens", 0) or 0) if details else 0


def summary(runs: list[tuple[dict, float]], turns: int) -> tuple[float, float, float, str]:
    """(median wall, last turn's TTFT p50, cached share of prompt tokens on turns 2..,
    each run's wall and TTFT p50) over `runs` pooled."""
    later = [r[1] for out, _ in runs for t in range(1, turns) for r in out[t]]
    prompt = sum(u.prompt_tokens for u in later)
    share = sum(_cached(u) for u in later) / prompt if prompt else float("nan")
    last = [r[0] for out, _ in runs for r in out[turns - 1]]
    each = ", ".join(f"{wall:.1f} s/{statistics.median(r[0] for r in out[turns - 1]) * 1000:.0f}"
                     for out, wall in runs)
    return statistics.median(w for _, w in runs), statistics.median(last), share, each


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--think", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from pichat.models import resolve

    model = str(resolve("default")[0])
    runs: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    peers = await asyncio.to_thread(build_peers)
    if shutil.which("nginx") is None:
        print("(nginx is not installed: `apt-get install nginx-light`; the proxy is skipped)")
    placed: dict[str, int] = defaultdict(int)
    for _ in range(args.repeat):
        async with pichat(2, 2, 1) as (base, _, client):
            runs["pichat, 2 workers x 2 slots"].append(await conversations(base, args))
            counters = (await client.status())["requests"]
            for key in ("affinity_hits", "spills", "placed_by_load", "prefix_hits",
                        "states_moved"):
                placed[key] += counters.get(key, 0)
        if peers is None or shutil.which("nginx") is None:
            continue
        async with AsyncExitStack() as stack:
            servers = [(await stack.enter_async_context(
                llama_server(peers, model, 2, threads=1)))[0] for _ in range(2)]
            base = await stack.enter_async_context(nginx(servers))
            runs["2 x llama-server --parallel 2 + nginx"].append(
                await conversations(base, args))
    lines = [f"{args.users} users x {args.turns} turns, {args.max_tokens}-token answers, "
             f"think 0-{args.think:.0f} s, {args.repeat} runs each: median wall s, "
             f"turn-{args.turns} TTFT p50 ms (all runs), cached share of prompt tokens on "
             "turns 2-8 (all runs); then each run's wall s/TTFT p50 ms"]
    figures = {label: summary(r, args.turns) for label, r in runs.items()}
    for label, (wall, ttft, share, each) in figures.items():
        lines.append(f"{label:40} wall {wall:6.1f}   TTFT {ttft * 1000:7.0f}   "
                     f"cached {share:.2f}   ({each})")
    lines.append("pichat's placements, all runs: " + ", ".join(f"{k} {v}"
                                                             for k, v in placed.items()))
    if len(figures) == 2:
        (w1, t1, _, _), (w2, t2, _, _) = figures.values()
        lines.append(f"pichat / proxy: wall {w1 / w2:.2f} (target <= 0.8), turn-{args.turns} "
                     f"TTFT {t1 / t2:.2f} (target <= 0.5)")
    return lines


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
