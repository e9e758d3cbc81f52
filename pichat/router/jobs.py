"""The router's side of one request: where its answer goes, what the client has been sent,
and how the answer continues on another worker when its worker dies mid-stream.

Pure bookkeeping (no I/O): the router service feeds it the chunks and the DONE it
forwards. Failover rests on two facts kept here: the token ids the client has (every
chunk carries those of its own text), and how many chunks it has (the next worker's
chunks are numbered on from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from pichat.protocol import Chunk, Done, Error, Request

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
    text: list[str] = field(default_factory=list)
    """The answer so far (recorded in the prefix index when it completes)."""
    tokens: list[int] = field(default_factory=list)
    """The token ids of the answer delivered so far."""
    chunks: int = 0
    """Chunks delivered to the client."""
    seq_base: int = 0
    """Chunks delivered before the current worker took over (its seq 0 is this one)."""
    resumed: int = 0
    """Tokens the current worker was given as a continuation."""
    failovers: int = 0

    def delivered(self, chunk: Chunk) -> Chunk | None:
        """Record a chunk on its way to the client. Returns it renumbered when a failover
        shifted the numbering (it must be encoded again), else None (forward as is)."""
        self.text.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        self.chunks += 1
        return replace(chunk, seq=self.seq_base + chunk.seq) if self.seq_base else None

    def continue_elsewhere(self) -> Request:
        """The request for the worker that takes over mid-answer: the same conversation,
        continued after the tokens the client has (after the client's own continuation,
        if it sent one), with the token budget that is left."""
        resumed = tuple(self.tokens)
        sampling = self.request.sampling
        outgoing = replace(
            self.request, continuation=self.request.continuation + resumed,
            sampling=replace(sampling, max_tokens=max(1, sampling.max_tokens - len(resumed))))
        self.outgoing = outgoing
        self.seq_base = self.chunks
        self.resumed = len(resumed)
        self.failovers += 1
        return outgoing

    def final(self, done: Done) -> Done | None:
        """The DONE as if one worker had answered (the continuation a worker was given
        counts as generated, not as prompt), with the number of failovers; None if no
        failover happened (forward as is)."""
        if not self.failovers:
            return None
        return done.continued(self.resumed, self.failovers)
