"""Recognising a conversation from its messages, for clients that keep no session id.

OpenAI-style clients send the whole conversation every turn. Each message extends a hash
chain (h1 = H(m1), h2 = H(h1, m2), ...), so a conversation's history is identified by one
hash per prefix. When an answer completes, the router records the chain of the messages
plus the answer: the last hash as a *full* state of that conversation (its session), the
shorter ones as prefixes it passes through. A later request whose messages extend a full
state is that conversation's next turn: it gets the same session, hence the same worker
and its warm KV cache. A request that only shares a shorter prefix (typically a system
prompt common to many conversations) gets a weak preference for a worker holding that
prefix, which the scheduler honours only within a load bound.

A request's tools come before its messages in the prompt (Open WebUI sends its 36
built-in tools, some 6,500 tokens, with every message; Home Assistant its 30-100 with
every command, each a new conversation), so they seed the chain and are a prefix of their
own: a new conversation with the same tools goes, within that bound, to the worker whose
cache holds them, instead of reading them again elsewhere (minutes on a Pi).

Pure and bounded: no I/O, least recently used entries dropped past `max_entries`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pichat.protocol import ChatMessage, SessionId

__all__ = ["chain", "head", "state", "Match", "PrefixIndex", "STATE_BYTES"]

STATE_BYTES = 16
"""The size of each hash of the chain."""


def head(tools: str) -> bytes:
    """The hash the chain of a request with `tools` starts from (b"" without tools)."""
    return hashlib.blake2b(b"tools\0" + tools.encode(), digest_size=STATE_BYTES).digest() \
        if tools else b""


def chain(messages: Sequence[ChatMessage], tools: str = "") -> list[bytes]:
    """One 16-byte hash per prefix of `messages` (after `tools`)."""
    return _links(head(tools), messages)


def state(messages: Sequence[ChatMessage], answer: str, tools: str = "") -> bytes:
    """The hash a `PrefixIndex.record` of this answer keeps as the conversation's state."""
    return _links(head(tools), [*messages, ChatMessage("assistant", answer)])[-1]


def _links(h: bytes, messages: Sequence[ChatMessage]) -> list[bytes]:
    out: list[bytes] = []
    for m in messages:
        h = hashlib.blake2b(h + m.role.encode() + b"\0" + m.content.encode(),
                            digest_size=STATE_BYTES).digest()
        out.append(h)
    return out


@dataclass(frozen=True, slots=True)
class Match:
    session: SessionId | None = None
    """The conversation this request continues (its last answer is in the messages)."""
    shared: SessionId | None = None
    """A conversation that shares a shorter prefix with this request."""
    depth: int = 0
    """Messages matched (0 with `shared`: the tools alone)."""


@dataclass(slots=True)
class _Entry:
    session: SessionId
    full: bool


class PrefixIndex:
    def __init__(self, max_entries: int = 80_000) -> None:
        self.max_entries = max_entries
        """About 200 bytes each."""
        self.dropped = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, messages: Sequence[ChatMessage], tools: str = "") -> Match:
        """The deepest recorded conversation state that `messages` extend (strictly: the
        request adds at least one message), else the deepest shared prefix (which may be
        `tools` alone)."""
        root = head(tools)
        hashes = _links(root, messages)
        shared: _Entry | None = None
        shared_depth = 0
        for depth in range(len(hashes) - 1, 0, -1):
            entry = self._entries.get(hashes[depth - 1])
            if entry is None:
                continue
            self._entries.move_to_end(hashes[depth - 1])
            if entry.full:
                return Match(session=entry.session, depth=depth)
            if shared is None:
                shared, shared_depth = entry, depth
        if shared is None and root and (entry := self._entries.get(root)):
            self._entries.move_to_end(root)
            shared = entry
        if shared is not None:
            return Match(shared=shared.session, depth=shared_depth)
        return Match()

    def remember(self, state: bytes, session: SessionId) -> None:
        """`session` is in the conversation state `state` (the last hash of a `record`'s
        chain, as a worker that answered it through another router computed it)."""
        self._entries[state] = _Entry(session, full=True)
        self._entries.move_to_end(state)
        self._bound()

    def record(self, messages: Sequence[ChatMessage], answer: str, session: SessionId,
               tools: str = "") -> None:
        """`session` answered `messages` (after `tools`) with `answer`: remember the
        conversation's state."""
        root = head(tools)
        hashes = _links(root, [*messages, ChatMessage("assistant", answer)])
        for h in ([root] if root else []) + hashes[:-1]:
            entry = self._entries.get(h)
            if entry is None:
                self._entries[h] = _Entry(session, full=False)
            elif not entry.full:
                entry.session = session  # the most recent holder of this prefix
            self._entries.move_to_end(h)
        self._entries[hashes[-1]] = _Entry(session, full=True)
        self._entries.move_to_end(hashes[-1])
        self._bound()

    def _bound(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.dropped += 1
