"""ZeroMQ sockets on an asyncio loop, the fast way, shared by router, worker and client.

Why not `zmq.asyncio` and `await sock.recv_multipart()`: measured here, a broker built on
it forwards ~7x fewer messages than one that drains the socket from a reader callback
(the futures cost ~19 us per message), and cancelling a pending `recv` can lose a message.
So each socket gets exactly one reader: a callback on the socket's file descriptor that
drains every waiting message with NOBLOCK. Sends are NOBLOCK too and happen on the loop's
thread only (ZeroMQ sockets are not thread-safe).

The ZeroMQ FD is edge-triggered: it signals "something changed", and a send can consume
that signal. After every send we therefore schedule one more drain (`kick`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import zmq

__all__ = ["Channel", "configure"]

log = logging.getLogger(__name__)

_BATCH = 256
"""Messages handled per drain before yielding to other callbacks (fairness)."""


def configure(sock: zmq.Socket, *, max_message_bytes: int, hwm: int = 100_000) -> None:
    """Options every pichat socket gets."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if sock.type == zmq.ROUTER:
        # Without this a ROUTER silently drops messages for peers that are gone or full;
        # with it, send raises EHOSTUNREACH / EAGAIN and we can act on it.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.BACKLOG, 4096)


class Channel:
    """One socket driven from an asyncio loop: `handler(frames)` for each message received,
    `send(frames)` to send. Exceptions from the handler are logged, never propagated: a
    bad message must not stop the loop."""

    def __init__(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self.handler = handler
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._closed = False
        self.loop.add_reader(self._fd, self._drain)
        self.kick()

    def kick(self) -> None:
        """Make sure waiting messages are read soon (after a send, or a full batch)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message without blocking. Raises zmq.ZMQError (EAGAIN when
        the peer's queue is full, EHOSTUNREACH on a ROUTER for an unknown peer)."""
        sock = self.sock
        last = len(frames) - 1
        # Frame by frame with SNDMORE: measured ~30 % cheaper than send_multipart.
        for i, frame in enumerate(frames):
            sock.send(frame, zmq.NOBLOCK | (zmq.SNDMORE if i < last else 0))
        self.kick()

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; `linger_ms` lets already-sent messages out first."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._fd)
        self.sock.close(linger=linger_ms)

    @property
    def closed(self) -> bool:
        return self._closed

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(_BATCH):
            if self._closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("recv failed: %s", exc)
                return
            try:
                self.handler(frames)
            except Exception:
                log.exception("handler failed on a %d-frame message; continuing", len(frames))
        self.kick()
