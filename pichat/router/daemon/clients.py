"""The router's side facing ZeroMQ clients: requests, cancels and STATUS.

Each message says who sent it (the transport's sender: the client's key name, or its
address), which becomes the request's owner. A request goes to `Router.submit` with a
`ZmqSink` that sends its answer back on this socket. STATUS is answered from one encoded
snapshot shared by every reply (zero-copy), built again only when something changed (or
after `STATUS_TTL`), and at most `status_per_s` times a second for one connection.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pichat.errors import ErrorCode, ProtocolError
from pichat.logs import Throttle
from pichat.protocol import (
    Cancel,
    Chunk,
    Conversations,
    Done,
    Error,
    Heartbeat,
    Request,
    RequestId,
    Status,
    decode,
    encode,
)
from pichat.router.daemon.memory import Memory
from pichat.router.daemon.workers import HEARTBEAT
from pichat.router.observe.stats import Stats
from pichat.router.policy.jobs import ClientJob, ReplySink
from pichat.router.policy.ratelimit import RateLimit
from pichat.security import Gatekeeper

__all__ = ["ClientSide", "ZmqSink", "STATUS_TTL"]

log = logging.getLogger(__name__)

STATUS_TTL = 1.0
"""A STATUS snapshot is reused while nothing has changed, for at most this long."""


class ZmqSink:
    """A request's answer, to the ZeroMQ client that sent it."""

    __slots__ = ("side", "key")

    def __init__(self, side: ClientSide, client: bytes) -> None:
        self.side = side
        self.key = client

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        return self.side.router.send_client(self.key, frames or encode(message))

    def keepalive(self) -> bool:
        return self.side.router.send_client(self.key, HEARTBEAT)


class ClientHub(Protocol):
    """What the client side needs of the router, and all it may touch."""

    stats: Stats
    throttle: Throttle
    status_limit: RateLimit
    version: int
    gatekeeper: Gatekeeper | None
    memory: Memory

    def now(self) -> float: ...

    def changed(self) -> None: ...

    def submit(self, request: Request, sink: ReplySink, *, owner: str = "") -> None: ...

    def cancel(self, job_id: RequestId) -> None: ...

    def client(self, job_id: RequestId) -> ClientJob | None: ...

    def snapshot(self) -> dict[str, Any]: ...

    def send_client(self, client: bytes, frames: list[bytes], copy: bool = True) -> bool: ...


class ClientSide:
    def __init__(self, router: ClientHub) -> None:
        self.router = router
        self._status: tuple[int, float, list[bytes]] | None = None
        """(state version, when, the encoded STATUS)."""

    def on_message(self, frames: list[bytes], sender: str) -> None:
        r = self.router
        client, body = frames[0], frames[1:]
        if r.gatekeeper is not None and not r.gatekeeper.admits("clients", sender):
            self._refuse_revoked(client, body)  # its CURVE session outlived its key
            return
        try:
            message = decode(body)
        except ProtocolError as exc:
            r.stats.rejected[exc.code.value] += 1
            r.throttle.log(r.now(), logging.WARNING, "bad client message",
                           "client %s (%s): bad message: %s", client.hex(), sender, exc,
                           detail=sender)
            r.send_client(client, encode(Error(exc.request_id, exc.code, str(exc))))
            return
        if isinstance(message, Status):
            self._send_status(client)
            return
        if isinstance(message, Conversations):
            r.memory.on_query(client, message, sender)
            return
        r.changed()
        match message:
            case Request():
                r.submit(message, ZmqSink(self, client), owner=sender)
            case Cancel():
                self._on_cancel(client, message.id)
            case Heartbeat():
                pass
            case _:
                r.stats.rejected["bad_request"] += 1
                r.send_client(client, encode(Error(
                    "", ErrorCode.BAD_REQUEST,
                    f"{message.COMMAND.name} is not a client command")))

    def _refuse_revoked(self, client: bytes, body: list[bytes]) -> None:
        """Answer a revoked key's message with an ERROR (none for a heartbeat): one reply
        per message, as for any message, and nothing it asks for is done."""
        r = self.router
        r.stats.events["revoked_client_messages"] += 1
        try:
            message = decode(body)
        except ProtocolError:
            return
        if isinstance(message, Heartbeat):
            return
        ref = message.ref if isinstance(message, Conversations) else getattr(message, "id", "")
        r.send_client(client, encode(Error(ref, ErrorCode.BAD_REQUEST,
                                           "this client's key was revoked on the router "
                                           "(pichat keys revoke): join again with a new "
                                           "token and another name")))

    def on_dropped(self, frames: list[bytes], n_frames: int) -> None:
        r = self.router
        r.changed()
        r.stats.rejected["protocol"] += 1
        message = (f"a message of {n_frames - 1} frames was dropped unread; the protocol has "
                   "3 (tag, command, body)")
        r.throttle.log(r.now(), logging.WARNING, "too many frames", "client %s: %s",
                       frames[0].hex(), message, detail=frames[0].hex())
        r.send_client(frames[0], encode(Error("", ErrorCode.PROTOCOL, message)))

    def _on_cancel(self, client: bytes, job_id: RequestId) -> None:
        job = self.router.client(job_id)
        if job is None or job.sink.key != client:
            return  # finished already, or not this client's: nothing to do
        log.info("req=%s cancelled by client", job_id)
        job.sink.deliver(Error(job_id, ErrorCode.CANCELLED, "cancelled by the client"), None)
        self.router.cancel(job_id)

    def _send_status(self, client: bytes) -> None:
        """Every STATUS is answered, from one encoded snapshot shared by every reply
        (zero-copy: a queued reply costs a reference, not a copy). It is built again when
        something changed, or after `STATUS_TTL`, and for a client over its rate only when
        there is none yet: a flood costs a send each, never a snapshot each."""
        r = self.router
        now = r.now()
        cached = self._status
        stale = cached is None or cached[0] != r.version or now - cached[1] > STATUS_TTL
        if stale and (cached is None or r.status_limit.allow(client, now)):
            r.stats.events["status_snapshots"] += 1
            cached = self._status = (r.version, now, encode(Status(r.snapshot())))
        elif stale:
            r.stats.events["status_throttled"] += 1
        assert cached is not None
        r.stats.events["status_replies"] += 1
        r.send_client(client, cached[2], copy=False)
