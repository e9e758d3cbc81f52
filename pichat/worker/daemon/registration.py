"""One router a worker serves: its link, when it was last heard, and its epoch.

A worker registers with every router it is given (routers that share one store), so a
router's death costs it neither a restart nor a join: each registration connects, is
heard, falls silent and registers again on its own. A request belongs to the registration
it came by; ending a registration bumps its epoch, and nothing of an older epoch is sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import zmq

from pichat.link import Link

__all__ = ["Registration"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Registration:
    endpoint: str
    link: Link | None = None
    connected_at: float = 0.0
    last_heard: float = 0.0
    epoch: int = 0
    resetting: bool = False
    """Ending: what it sent is being cancelled; its new requests are refused meanwhile."""
    register_again: asyncio.Event = field(default_factory=asyncio.Event)
    """The router does not know us (it restarted, or gave us up for dead)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to cut short a wait of this registration's loop (stop, register again)."""
    evicted: list[str] = field(default_factory=list)
    """Sessions dropped here that its router has not heard of yet."""
    warmed: dict[str, str] = field(default_factory=dict)
    """Sessions (with their leases) a turn began for through another router, that this
    router has not heard of yet: their newest state is here."""
    answered: dict[str, str] = field(default_factory=dict)
    """Of those, the ones whose turn ended: session -> the conversation's state hash."""
    waiting: float | None = None
    """When a request of this router's was first refused for want of a slot (every one
    taken by another router's requests) since it last got one; None: not waiting."""
    refused: float = 0.0
    """When the last was."""

    @property
    def heard(self) -> bool:
        """Whether the router answered on this connection."""
        return self.last_heard > self.connected_at

    @property
    def open(self) -> bool:
        return self.link is not None and not self.link.channel.closed

    def send(self, frames: list[bytes]) -> None:
        if not self.open:
            return
        try:
            self.link.channel.send(frames)
        except zmq.ZMQError as exc:
            # EAGAIN: no connection to this router right now. It will give up on these
            # requests; the next epoch starts clean.
            log.debug("send to %s failed: %s", self.endpoint, exc)

    def close(self, linger_ms: int = 0) -> None:
        if self.link is not None:
            self.link.close(linger_ms)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early for a stop or a DISCONNECT."""
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            pass
        self.wake.clear()
