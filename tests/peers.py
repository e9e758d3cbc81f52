"""Hand-driven protocol peers for in-process tests: they send exactly the frames a test
chooses (including malformed ones) and assert on what comes back."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from pichat.protocol import Message, decode, encode

__all__ = ["Peer"]


class Peer:
    """A DEALER (a fake worker or client) or a bound ROUTER (a fake router)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, *, bind: bool = False,
                 max_message_bytes: int = -1, secure=None) -> None:
        """`secure(socket)`: set up CURVE before connecting (`Keys.secure_client`)."""
        self.sock = ctx.socket(zmq.ROUTER if bind else zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if secure is not None:
            secure(self.sock)
        if bind:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.sock.bind(endpoint)  # tcp://127.0.0.1:* picks a free port
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.peer: bytes | None = None
        """ROUTER: the routing id of the last sender (replies go there)."""

    async def send(self, message: Message | list[bytes]) -> None:
        frames = message if isinstance(message, list) else encode(message)
        if self.sock.type == zmq.ROUTER:
            assert self.peer is not None, "no peer has spoken yet"
            frames = [self.peer, *frames]
        await self.sock.send_multipart(frames)

    async def recv_frames(self, timeout: float = 5.0) -> list[bytes]:
        # poll, then a non-blocking recv: never cancel a pending recv (it can lose a message)
        if not await self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"nothing received within {timeout}s")
        frames = await self.sock.recv_multipart(zmq.NOBLOCK)
        if self.sock.type == zmq.ROUTER:
            self.peer, frames = frames[0], frames[1:]
        return frames

    async def recv(self, timeout: float = 5.0, skip_heartbeats: bool = True) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            message = decode(await self.recv_frames(max(0.0, deadline - time.monotonic())))
            if not (skip_heartbeats and type(message).__name__ == "Heartbeat"):
                return message

    async def expect(self, kind: type, timeout: float = 5.0, **fields) -> Message:
        """The next non-heartbeat message, which must be a `kind` with `fields`."""
        message = await self.recv(timeout, skip_heartbeats=kind.__name__ != "Heartbeat")
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message}"
        for key, value in fields.items():
            assert getattr(message, key) == value, f"{key}: {getattr(message, key)!r} != {value!r}"
        return message

    async def silent(self, seconds: float) -> None:
        """Assert that nothing but heartbeats arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await self.recv(left)
            except TimeoutError:
                return
            raise AssertionError(f"unexpected {message}")

    def close(self) -> None:
        self.sock.close(linger=0)


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


async def until_status(client, predicate, timeout: float = 60.0) -> dict:
    """The router's status (through `client`) once `predicate(status)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status()
        if predicate(status):
            return status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.05)
