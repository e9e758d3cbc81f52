"""Hostile peers for the fault lab, run from their own "host": an admitted client and an
admitted worker (their keys are on the router's allow-lists) that use the protocol
against the router, while the lab's load goes on. Each attack is one the router must
bound (docs/security.md, Bounds); the lab reports what the router's memory and event loop did and
that the load lost nothing.

    attack.py client --router tcp://R:5555 --http http://R:8080 --keys DIR
    attack.py worker --router tcp://R:5556 --keys DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pichat.client import Client  # noqa: E402
from pichat.config import ClientConfig  # noqa: E402
from pichat.errors import PichatError  # noqa: E402
from pichat.protocol import (  # noqa: E402
    TAG,
    ChatMessage,
    Command,
    Disconnect,
    Ready,
    Sampling,
    Status,
    encode,
)
from pichat.security import keygen, resolve_keys  # noqa: E402

BOMB = msgpack.packb({"id": "bomb", "messages": [{"role": "user", "content": "x"}],
                      "junk": [[[]] * 4000] * 900})
"""3.6 MB that a naive decoder turns into 3.6 million lists."""
ENDLESS = [b"x" * (1 << 20)] * 192
"""192 frames of 1 MiB after a message's three: each within --max-message-bytes."""


def dealer(ctx: zmq.asyncio.Context, endpoint: str, keys, name: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    if keys is not None:
        keys.secure_client(sock, name)
    sock.connect(endpoint)
    return sock


async def client_attack(args: argparse.Namespace, report: dict) -> None:
    keys = resolve_keys(args.keys)
    ctx = zmq.asyncio.Context()
    sock = dealer(ctx, args.router, keys, "evil")
    for _ in range(8):
        await sock.send_multipart([TAG, bytes([Command.REQUEST]), BOMB])
    await sock.send_multipart([*encode(Status()), *ENDLESS])
    for _ in range(40_000):
        await sock.send_multipart(encode(Status()))  # never read
    report["sent"] = "8 decoding bombs, a 195-frame message, 40,000 STATUS never read"

    # Handshakes with a key the router does not know.
    stranger = Path(args.keys).parent / "stranger"
    keygen(stranger, api_key=False)
    (stranger / "router.key").write_bytes((Path(args.keys) / "router.key").read_bytes())
    unknown = resolve_keys(str(stranger))
    strangers = [dealer(ctx, args.router, unknown, "client") for _ in range(300)]

    # Silent and dribbling HTTP connections.
    host, port = args.http.removeprefix("http://").rsplit(":", 1)
    held = []
    for _ in range(600):
        try:
            held.append(await asyncio.open_connection(host, int(port)))
        except OSError:
            break
    for _, writer in held[:100]:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and no more

    # A heavy user: more requests than every slot and the queue can hold, at once.
    config = ClientConfig(router=args.router, keys=keys, key_name="evil", silence_timeout=60)
    async with Client(config) as hog:
        async def one(i: int) -> str:
            try:
                await hog.chat([ChatMessage("user", f"hog {i}")],
                               sampling=Sampling(temperature=0, max_tokens=8))
                return "answered"
            except PichatError as exc:
                return exc.code.value
        outcomes = await asyncio.gather(*(one(i) for i in range(400)))
    report["hog"] = {o: outcomes.count(o) for o in set(outcomes)}
    report["http_refused"] = sum(1 for reader, _ in held if reader.at_eof())
    for _, writer in held:
        writer.close()
    for s in [sock, *strangers]:
        s.close(linger=0)
    ctx.term()


async def worker_attack(args: argparse.Namespace, report: dict) -> None:
    keys = resolve_keys(args.keys)
    ctx = zmq.asyncio.Context()
    # Another worker's name, with this worker's own (admitted) key.
    thief = dealer(ctx, args.router, keys, "evil")
    await thief.send_multipart(encode(Ready("w1", "m", "sim", 8, 4096, "evil")))
    # Warm sessions it never held, with forged leases; it leaves right away.
    forger = dealer(ctx, args.router, keys, "evil")
    forged = tuple((f"{i:012x}~s{i}", "0" * 32) for i in range(5000))
    await forger.send_multipart(encode(Ready("evil", "m", "sim", 1, 4096, "evil", forged)))
    await forger.send_multipart(encode(Disconnect("bye")))
    # Decoding bombs and an endless message, as a worker.
    bomber = dealer(ctx, args.router, keys, "evil")
    for _ in range(8):
        await bomber.send_multipart([TAG, bytes([Command.CHUNK]), BOMB])
    await bomber.send_multipart([*encode(Status()), *ENDLESS])
    await asyncio.sleep(2.0)  # let the router read it all before the sockets go
    answers = []
    while await thief.poll(100):
        answers.append(await thief.recv_multipart())
    report["sent"] = ("READY as w1; READY with 5,000 forged warm claims; 8 decoding bombs; "
                      "a 195-frame message")
    report["thief_told"] = [bytes(f[2])[:80].decode(errors="replace") for f in answers
                            if len(f) == 3 and f[1] == bytes([Command.ERROR])]
    for s in (thief, forger, bomber):
        s.close(linger=0)
    ctx.term()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client", "worker"])
    parser.add_argument("--router", required=True)
    parser.add_argument("--http", default="")
    parser.add_argument("--keys", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report: dict = {}
    await (client_attack if args.role == "client" else worker_attack)(args, report)
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
