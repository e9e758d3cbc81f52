"""Conversations kept by the router: what a store holds and the interface every store
offers (SQLite by default: pichat/memory/sqlite.py).

A conversation belongs to its owner (the client key or API key that created it): every
call names the owner, and a conversation of another owner is, to that caller, one that
does not exist. What one owner can make the store hold is bounded (`Limits`): a call
past a bound fails with `LimitReached` and stores nothing; the whole store is kept under
its byte bound by dropping the least recently updated conversations (an owner over its
own share loses its oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pichat.errors import BadRequest, PichatError

__all__ = [
    "Conflict", "Conversation", "Limits", "LimitReached", "Message", "NewerStore",
    "NotFound", "Store", "Summary", "check_after", "check_count", "measure", "victims",
    "MESSAGE_OVERHEAD",
]

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_OVERHEAD = 64
"""Bytes a message is counted for beyond its text (its row, its index entry)."""


class NotFound(BadRequest):
    """No conversation of this id is the caller's."""


class LimitReached(BadRequest):
    """A bound of the store (messages, conversations, bytes) would be passed."""


class Conflict(BadRequest):
    """The conversation changed since this turn began (a turn of it was answered through
    another router meanwhile): the turn is not added, so its history cannot fork."""


class NewerStore(PichatError):
    """The database was written by a newer pichat: refused rather than damaged."""


@dataclass(frozen=True, slots=True)
class Limits:
    conversations_per_owner: int = 1000
    messages_per_conversation: int = 5000
    message_chars: int = 256 * 1024
    conversation_bytes: int = 8 << 20
    """One conversation's text at most (a turn past it is refused: start a new one)."""
    max_bytes: int = 1 << 30
    """The whole store: least recently updated conversations dropped past it."""
    owner_share: float = 0.25
    """Of `max_bytes`, what one owner may hold before its own oldest are dropped (an owner
    alone cannot push every other owner's conversations out)."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    created: float = 0.0
    model: str = ""
    worker: str = ""
    """Who answered (assistant messages)."""


@dataclass(frozen=True, slots=True)
class Summary:
    """A conversation as a list shows it."""

    id: str
    title: str
    model: str
    created: float
    updated: float
    messages: int


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    owner: str
    title: str
    model: str
    created: float
    updated: float
    messages: tuple[Message, ...] = ()
    memory: str = ""
    """What the model wrote of the turns that slid out of its context."""
    remembered: int = 0
    """How many of the first messages (after the system ones) `memory` stands for."""
    total: int = 0
    """Messages it holds (`messages` may be a page of them)."""
    turns: tuple[str, ...] = ()
    """The request ids of its last kept turns, newest last (stores shared by routers keep
    them: a turn sent again through another router is then not answered twice)."""


class Store(Protocol):
    """What the router asks of a store. Every method may block on I/O: the router calls
    them off its event loop (`pichat.memory.sqlite.SQLiteStore` runs them on a thread of
    its own)."""

    async def create(self, owner: str, *, title: str = "", model: str = "",
                     messages: tuple[Message, ...] = ()) -> Conversation: ...

    async def get(self, owner: str, conversation: str, offset: int = 0,
                  limit: int | None = None) -> Conversation:
        """With its messages from `offset` (`limit` of them; None: all). Raises NotFound."""

    async def find(self, owner: str, title: str) -> Conversation | None:
        """The owner's most recently updated conversation of this title (without its
        messages)."""

    async def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[Summary]:
        """Most recently updated first."""

    async def append(self, owner: str, conversation: str, messages: tuple[Message, ...],
                     after: int | None = None, turn: str = "") -> None:
        """After the conversation's first `after` messages, which must be all it holds
        (None: after whatever it holds); `turn`: the request id it answers (kept in
        `Conversation.turns` by stores that keep them). Raises NotFound, LimitReached,
        Conflict (then nothing is stored)."""

    async def rename(self, owner: str, conversation: str, title: str) -> None: ...

    async def remember(self, owner: str, conversation: str, memory: str,
                       remembered: int) -> None:
        """Keep `memory` as what the first `remembered` messages said."""

    async def delete(self, owner: str, conversation: str) -> bool: ...

    async def close(self) -> None: ...


# --- the bounds every store keeps the same way -------------------------------------------

def check_after(cid: str, n: int, after: int | None) -> None:
    """Before a turn that followed `after` messages is added to conversation `cid`, which
    holds `n` now."""
    if after is not None and n != after:
        raise Conflict(f"conversation {cid} was continued elsewhere while this turn was "
                       f"answered ({n} messages, not {after}): this turn was not kept")


def check_count(count: int, limits: Limits) -> None:
    """Before an owner holding `count` conversations makes another."""
    if count >= limits.conversations_per_owner:
        raise LimitReached(f"you have {count} stored conversations, the most this router "
                           "keeps per user: delete some first")


def measure(messages: tuple[Message, ...], limits: Limits, n: int, nbytes: int) -> int:
    """The bytes `messages` add to a conversation of `n` messages and `nbytes`; raises
    LimitReached if they may not be added."""
    if n + len(messages) > limits.messages_per_conversation:
        raise LimitReached(f"the conversation has {n} messages, and this router keeps at "
                           f"most {limits.messages_per_conversation}: start a new one")
    added = 0
    for m in messages:
        if m.role not in ROLES:
            raise LimitReached(f"a message's role must be one of {ROLES}")
        if len(m.content) > limits.message_chars:
            raise LimitReached(f"a message of {len(m.content)} characters; this router "
                               f"keeps at most {limits.message_chars}")
        added += len(m.content.encode()) + MESSAGE_OVERHEAD
    if nbytes + added > min(limits.conversation_bytes, limits.max_bytes * limits.owner_share):
        raise LimitReached("the conversation is too large for this router to keep: "
                           "start a new one")
    return added


def victims(rows: list[tuple[str, int]], total: int, bound: float, keep: str
            ) -> list[tuple[str, int]]:
    """Of conversations `rows` (id, bytes; least recently updated first) holding `total`
    bytes, those to drop to get within `bound`, never `keep`."""
    out = []
    for cid, nbytes in rows:
        if total <= bound:
            break
        if cid != keep:
            out.append((cid, nbytes))
            total -= nbytes
    return out
