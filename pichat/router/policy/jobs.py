"""The router's side of one request: where its answer goes, and the stream so far.

Pure bookkeeping (no I/O): the router service feeds it the chunks and the DONE it
forwards; failover (another worker continuing an answer) is the shared stream cursor's
(pichat/stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pichat.protocol import Chunk, Done, Error, Request
from pichat.stream import StreamCursor

__all__ = ["ReplySink", "ClientJob"]


class ReplySink(Protocol):
    """Where a request's answer goes: a ZeroMQ client, or an HTTP response in this process."""

    key: object
    """Requests whose sinks share a key share one keepalive (one ZeroMQ client)."""

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        """Pass on one message (`frames`: its encoding, when the router has it). False if
        the receiver is gone: the router then cancels the request."""

    def keepalive(self) -> bool:
        """Called every heartbeat interval while the request waits or runs."""


@dataclass(slots=True)
class ClientJob:
    sink: ReplySink
    request: Request
    """As the router accepted it: its session scoped to its owner, the owner's tag set."""
    arrived: float
    owner: str = ""
    outgoing: Request | None = None
    """The REQUEST as the current worker gets it (a continuation after a failover);
    None: `request` itself."""
    first_chunk: float | None = None
    cursor: StreamCursor = field(init=False)

    def __post_init__(self) -> None:
        self.cursor = StreamCursor(self.request)

    def continue_elsewhere(self) -> Request:
        """The request for the worker that takes over mid-answer."""
        self.outgoing = self.cursor.resume()
        return self.outgoing
