"""A worker's or client's connection to the router: a DEALER socket on a `Channel`,
secured with the keys when there are keys, and watched for refused handshakes (a refused
CURVE key looks like silence otherwise)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from pichat.security import Keys
from pichat.transport import Channel, configure

__all__ = ["Link", "watch_handshakes"]


_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the router refused this key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (keys or protocol)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed",
}


def watch_handshakes(sock: zmq.Socket, loop: asyncio.AbstractEventLoop,
                     on_failure: Callable[[str], None]) -> Channel:
    """Report failed CURVE handshakes of `sock` (a refused key looks like silence
    otherwise). Close the returned channel before the socket."""
    events = 0
    for event in _HANDSHAKE_FAILURES:
        events |= event
    monitor = sock.get_monitor_socket(events)

    def handle(frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        reason = _HANDSHAKE_FAILURES.get(event["event"])
        if reason:
            on_failure(f"{reason} (endpoint {event['endpoint'].decode(errors='replace')})")

    return Channel(monitor, handle, loop, max_frames=2)


class Link:
    """A worker's or client's DEALER connection to the router: a `Channel`, secured with
    `keys` when given, and watched for refused handshakes."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, keys: Keys | None, key_name: str,
                 max_message_bytes: int, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[list[bytes]], None],
                 on_refused: Callable[[str], None]) -> None:
        sock = ctx.socket(zmq.DEALER)
        configure(sock, max_message_bytes=max_message_bytes)
        self._monitor: Channel | None = None
        if keys is not None:
            keys.secure_client(sock, key_name)
            self._monitor = watch_handshakes(sock, loop, on_refused)
        sock.connect(endpoint)
        self.channel = Channel(sock, on_message, loop, max_frames=3)

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.channel.sock.disable_monitor()
            self._monitor.close()
            self._monitor = None
        self.channel.close(linger_ms)
