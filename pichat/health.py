"""A daemon's own health socket, and the probe behind `pichat health`.

With `--health-bind` (e.g. ipc:///tmp/pichat-health.ipc, as the Docker image sets it)
the router and the worker each answer STATUS on a local socket with a snapshot of
themselves that includes `healthy`. A container HEALTHCHECK (or any supervisor) runs
`pichat health`, which asks the process itself rather than guessing from outside: a
worker is healthy while it hears its router; a router while its loop answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq

from pichat.errors import PichatError, ProtocolError
from pichat.protocol import Status, decode, encode
from pichat.transport import Channel, configure

__all__ = ["HealthEndpoint", "probe"]

log = logging.getLogger(__name__)

_MAX_BYTES = 64 * 1024


class HealthEndpoint:
    """Answers STATUS with `snapshot()` on `endpoint`; ignores everything else."""

    def __init__(self, ctx: zmq.Context, endpoint: str, snapshot: Callable[[], dict[str, Any]],
                 loop: asyncio.AbstractEventLoop) -> None:
        sock = ctx.socket(zmq.ROUTER)
        configure(sock, max_message_bytes=_MAX_BYTES, hwm=100)
        sock.bind(endpoint)
        self.endpoint = endpoint
        self._snapshot = snapshot
        self._channel = Channel(sock, self._on_message, loop, max_frames=4)

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            message = decode(frames[1:])
        except ProtocolError:
            return
        if isinstance(message, Status):
            try:
                self._channel.send([frames[0], *encode(Status(self._snapshot()))])
            except zmq.ZMQError:
                pass  # the prober left

    def close(self) -> None:
        self._channel.close()


async def probe(endpoint: str, timeout: float = 3.0) -> dict[str, Any]:
    """Ask the daemon at `endpoint` for its snapshot. Raises PichatError if it does not
    answer within `timeout` seconds."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    configure(sock, max_message_bytes=4 * 1024 * 1024, hwm=100)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[dict[str, Any]] = loop.create_future()

    def on_message(frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except ProtocolError:
            return
        if isinstance(message, Status) and not answer.done():
            answer.set_result(dict(message.cluster))

    channel = Channel(sock, on_message, loop, max_frames=3)
    try:
        sock.connect(endpoint)
        channel.send(encode(Status()))
        return await asyncio.wait_for(answer, timeout)
    except (TimeoutError, zmq.ZMQError) as exc:
        raise PichatError(f"no answer from {endpoint} within {timeout:.0f}s ({exc or 'timeout'})"
                          ) from None
    finally:
        channel.close()
        ctx.term()
