"""What a connection costs the router in memory, and when that cost stops growing.

A ZeroMQ ROUTER keeps, for each connected peer, a pipe each way whose queue lives in
chunks of 256 messages, plus a chunk kept spare once the queue has wrapped; a chunk's
pages become resident as messages first pass through them. So a router's memory rises
with the messages each connection has carried, up to about 512 each way, and is flat
from then on. This measures it with a bare ROUTER (the same libzmq the pichat router
uses) and N DEALER peers exchanging messages in rounds. The soak's memory curve (`make
soak`) is this curve plus the router's bounded caches.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

import zmq

ROUNDS = (1, 100, 100, 100, 100, 100, 100, 200, 400)


def _echo(endpoint: str, ready) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        sock.send_multipart(sock.recv_multipart())


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(peers: int) -> list[tuple[int, float]]:
    """(messages each way per connection, router RSS MB) after each round."""
    endpoint = "ipc:///tmp/pichat-bench-connections.ipc"
    mp = multiprocessing.get_context("spawn")
    ready = mp.Event()
    router = mp.Process(target=_echo, args=(endpoint, ready), daemon=True)
    router.start()
    ready.wait(30)
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, peers + 16)
    socks = [ctx.socket(zmq.DEALER) for _ in range(peers)]
    try:
        for sock in socks:
            sock.connect(endpoint)
        time.sleep(0.5)
        points = [(0, _rss_mb(router.pid))]
        done = 0
        for n in ROUNDS:
            for _ in range(n):
                for sock in socks:
                    sock.send(b"x" * 100)
                for sock in socks:
                    sock.recv()
            done += n
            points.append((done, _rss_mb(router.pid)))
        return points
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        router.kill()
        router.join()


async def main(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=1000)
    args = parser.parse_args(argv)
    points = await asyncio.to_thread(measure, args.peers)
    base = points[0][1]
    lines = [f"{args.peers} connections; router RSS after each connection carried N "
             "messages each way:"]
    lines += [f"  N={n:5d}: {mb:6.1f} MB  ({(mb - base) * 1024 / args.peers:5.1f} KB per "
              "connection above the connected baseline)" for n, mb in points]
    at_512 = next(mb for n, mb in points if n >= 600)
    lines.append(f"from ~600 to {points[-1][0]} messages: {points[-1][1] - at_512:+.1f} MB "
                 f"(flat once every pipe has wrapped its queue chunk)")
    return lines


if __name__ == "__main__":
    import sys

    print("\n".join(asyncio.run(main(sys.argv[1:]))))
