"""A conversation's KV state, moved from one worker to another through the router.

The router sends MIGRATE to the worker holding a session warm; that worker (the source)
sends the state as STATE pieces: piece 0 describes it (session, owner, format, token ids,
size, SHA-256), every piece carries at most `MAX_STATE_PIECE` bytes. The receiving worker
(the target) acknowledges each piece with STATE_ACK, and the source keeps at most `WINDOW`
pieces unacknowledged, so a transfer of hundreds of MB never floods the links the answers
stream on. The target checks everything before it keeps the state (format, sizes against
its budget, digest) and answers `done` or `refused`; a source that cannot go on sends
`abort`. Either way the request is then sent to the target, which restores the state or
reads the conversation again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pichat.logs import clip
from pichat.protocol import MAX_STATE_PIECE, Migrate, State, StateAck, encode
from pichat.worker.engine.backend import SavedState

__all__ = ["StateMover", "WINDOW", "MAX_INCOMING", "MAX_OUTGOING"]

log = logging.getLogger(__name__)

WINDOW = 4
"""Pieces a source may have in flight (4 MiB)."""
MAX_INCOMING = 2
"""Transfers a worker receives at once (each holds its state in RAM until done)."""
MAX_OUTGOING = 2
"""Transfers a worker sends at once (each holds its state in RAM until sent)."""
STALL_S = 30.0
"""A transfer that hears nothing this long is given up (by either side)."""


@dataclass(slots=True)
class _Incoming:
    session: str
    owner: str | None
    format: str
    tokens: tuple[int, ...]
    data_bytes: int
    nbytes: int
    sha256: str
    buf: bytearray = field(default_factory=bytearray)
    next_seq: int = 1
    heard: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Outgoing:
    acked: int = -1
    event: asyncio.Event = field(default_factory=asyncio.Event)
    refused: str = ""
    done: bool = False


class StateMover:
    def __init__(self, *, send: Callable[[list[bytes]], None],
                 export: Callable[[str], Awaitable[SavedState | None]],
                 accept: Callable[[str, SavedState], None], state_format: str,
                 budget: int, max_tokens: int, token_bytes: int) -> None:
        self._send = send
        self._export = export
        self._accept = accept
        self.format = state_format
        self.budget = budget
        self.max_tokens = max_tokens
        self.token_bytes = token_bytes
        """KV cache bytes of one token in this model's format (what a state is made of)."""
        self._in: dict[str, _Incoming] = {}
        self._out: dict[str, _Outgoing] = {}
        self.sent = 0
        self.received = 0
        self.refused = 0

    # --- source ----------------------------------------------------------------------

    async def send_state(self, message: Migrate) -> None:
        """Answer a MIGRATE: send the session's state in acknowledged pieces."""
        tid = message.transfer
        if tid in self._out:
            return
        if len(self._out) >= MAX_OUTGOING:
            self._send(encode(State(tid, 0, abort="busy sending others")))
            return
        out = self._out[tid] = _Outgoing()
        try:
            state = await self._export(message.session)
            if state is None:
                self._send(encode(State(tid, 0, abort="the session is not warm here")))
                return
            digest = hashlib.sha256(state.data).hexdigest()
            data = memoryview(state.data)
            pieces = max(1, -(-len(data) // MAX_STATE_PIECE))
            for seq in range(pieces):
                while seq - out.acked > WINDOW and not out.refused:
                    out.event.clear()
                    try:
                        await asyncio.wait_for(out.event.wait(), STALL_S)
                    except TimeoutError:
                        self._send(encode(State(tid, seq, abort="no acknowledgement")))
                        return
                if out.refused:
                    log.info("state of session=%s refused by %s: %s", message.session,
                             clip(message.target, 60), out.refused)
                    return
                piece = bytes(data[seq * MAX_STATE_PIECE:(seq + 1) * MAX_STATE_PIECE])
                last = seq == pieces - 1
                if seq == 0:
                    self._send(encode(State(
                        tid, 0, piece, last, session=message.session, owner=state.owner,
                        format=state.format, tokens=state.tokens, data_bytes=len(data),
                        nbytes=state.nbytes, sha256=digest)))
                else:
                    self._send(encode(State(tid, seq, piece, last)))
            self.sent += 1
            log.info("state of session=%s (%d tokens, %.1f MB) sent to %s", message.session,
                     len(state.tokens), len(data) / 1e6, clip(message.target, 60))
        finally:
            del self._out[tid]

    def on_ack(self, ack: StateAck) -> None:
        out = self._out.get(ack.transfer)
        if out is None:
            return
        out.acked = max(out.acked, ack.seq)
        out.refused = ack.refused or out.refused
        out.done = out.done or ack.done
        out.event.set()

    # --- target ----------------------------------------------------------------------

    def on_state(self, piece: State) -> None:
        tid = piece.transfer
        if piece.abort:
            if self._in.pop(tid, None) is not None:
                log.info("state transfer %s aborted by its source: %s", tid,
                         clip(piece.abort, 120))
            return
        if piece.seq == 0:
            reason = self._check_header(piece)
            if reason:
                self._refuse(tid, reason)
                return
            self._in[tid] = _Incoming(piece.session, piece.owner, piece.format, piece.tokens,
                                      piece.data_bytes, piece.nbytes, piece.sha256)
        incoming = self._in.get(tid)
        if incoming is None:
            return  # refused or given up already: its later pieces are dropped
        if piece.seq != incoming.next_seq - (piece.seq == 0):
            self._refuse(tid, f"piece {piece.seq} out of order")
            return
        if len(incoming.buf) + len(piece.data) > incoming.data_bytes:
            self._refuse(tid, "more bytes than announced")
            return
        incoming.buf += piece.data
        incoming.next_seq = piece.seq + 1
        incoming.heard = time.monotonic()
        if not piece.last:
            self._send(encode(StateAck(tid, piece.seq)))
            return
        del self._in[tid]
        if len(incoming.buf) != incoming.data_bytes:
            self._refuse(tid, "fewer bytes than announced")
            return
        if hashlib.sha256(incoming.buf).hexdigest() != incoming.sha256:
            self._refuse(tid, "the digest does not match")
            return
        # Charged at what it holds here (the header's figure was checked against it).
        state = SavedState(incoming.tokens, bytes(incoming.buf),
                           self._cost(len(incoming.tokens), len(incoming.buf)),
                           owner=incoming.owner, format=incoming.format)
        self._accept(incoming.session, state)
        self.received += 1
        self._send(encode(StateAck(tid, piece.seq, done=True)))
        log.info("state of session=%s received (%d tokens, %.1f MB)", incoming.session,
                 len(incoming.tokens), len(incoming.buf) / 1e6)

    def _check_header(self, piece: State) -> str:
        if len(self._in) >= MAX_INCOMING:
            return "too many transfers at once"
        if not piece.session:
            return "no session"
        if piece.format != self.format:
            return f"made for {clip(piece.format, 80)}, not {clip(self.format, 80)}"
        if piece.data_bytes > self.budget or piece.nbytes > self.budget:
            return f"{piece.data_bytes} bytes is more than the session store holds"
        n = len(piece.tokens)
        if not 0 < n < self.max_tokens:
            return f"{n} tokens do not fit the context"
        # What a sender says a state costs is not believed: its bytes must be what this
        # model's state of that many tokens takes, and its size what those bytes cost.
        most = self._most_bytes(n)
        if piece.data_bytes > most:
            return (f"{piece.data_bytes} bytes for {n} tokens is more than this model's "
                    f"state of them ({most})")
        cost = self._cost(n, piece.data_bytes)
        if piece.nbytes != cost:
            return f"it declares {piece.nbytes} bytes, but {n} tokens in {piece.data_bytes} " \
                   f"bytes cost {cost}"
        return ""

    def _cost(self, n_tokens: int, data_bytes: int) -> int:
        """What holding a state costs: its bytes and its token ids (a simulated state has
        no bytes: its tokens at this model's size each)."""
        if data_bytes:
            return data_bytes + 4 * n_tokens
        return n_tokens * self.token_bytes

    def _most_bytes(self, n_tokens: int) -> int:
        """The largest state of `n_tokens` this model makes: their K and V rows, and
        llama.cpp's bookkeeping (measured: 12 bytes a token and 3 KiB, for f16, q8_0 and
        q4_0 caches, on the default model and a tiny one)."""
        return n_tokens * (self.token_bytes + 64) + (64 << 10)

    def _refuse(self, tid: str, reason: str) -> None:
        self._in.pop(tid, None)
        self.refused += 1
        log.warning("state transfer %s refused: %s; the conversation will be read again",
                    tid, reason)
        self._send(encode(StateAck(tid, refused=reason)))

    def expire(self) -> None:
        """Give up incoming transfers that stalled (their source died, say)."""
        now = time.monotonic()
        for tid in [t for t, i in self._in.items() if now - i.heard > STALL_S]:
            self._refuse(tid, "stalled")
