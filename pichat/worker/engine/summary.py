"""Memory of what slid out: before the oldest turns of a conversation leave the context
(pichat/worker/store/window.py), the model writes a short note of the conversation so far, and
the note stays after the system prompt while those turns are gone, so the assistant still
knows the user's name and the topic fifty turns on.

The note is written in the conversation's own slot, right where its KV state ends: the
slot already holds the system prompt (with the previous note), the turns since the last
slide and the last answer, so writing it costs reading one instruction and generating at
most `budget(n_ctx)` tokens, not reading the conversation again. A note stands for the
conversation's first `covers` messages after its system messages; it changes only when the
conversation slides again (in blocks: rarely), so between slides the prompt's start stays
the same and its KV state keeps being reused.

Where the note is kept: a stored conversation's with the conversation (the router sends it
back with each turn, `Request.memory`); any conversation's also here, by session and owner
(`Notes`, bounded), for clients that send their whole history each turn.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pichat.protocol import ChatMessage, Sampling

__all__ = ["Note", "Notes", "budget", "with_note", "request_messages", "digest", "clean",
           "sampling", "INSTRUCTION", "HEADER", "MAX_CHARS"]

INSTRUCTION = (
    "Stop here for a moment. Write a short note of this conversation so far for your own "
    "memory: the user's name and every fact they told you about themselves, what they "
    "asked and what you answered. At most 60 words, no preamble.")
"""The user turn that asks for a note (it never stays in the conversation)."""

HEADER = "Notes on the earlier part of this conversation (no longer shown): "
"""Put before the note in the system prompt."""

MAX_CHARS = 1200
"""A note is cut to this many characters (whatever the model writes)."""

MAX_TOKENS = 128
HEADER_TOKENS = 32
"""What `HEADER` and the system prompt's break take, with room to spare."""


def budget(n_ctx: int) -> int:
    """Tokens a note may take at most: an eighth of the context with its header, up to
    `MAX_TOKENS` (0: too small a context to take notes)."""
    n = min(MAX_TOKENS, n_ctx // 8 - HEADER_TOKENS)
    return n if n >= 16 else 0


def sampling(n_ctx: int) -> Sampling:
    """How a note is written: greedy, at most `budget(n_ctx)` tokens."""
    return Sampling(temperature=0.0, max_tokens=max(1, budget(n_ctx)), repeat_penalty=1.1)


@dataclass(frozen=True, slots=True)
class Note:
    text: str
    covers: int
    """The note stands for this many messages after the system messages."""
    digest: str = ""
    """Of those messages (`digest`): tells this conversation's note from another's."""


def digest(messages: Sequence[ChatMessage]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(m.role.encode())
        h.update(b"\0")
        h.update(m.content.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()


def clean(text: str) -> str:
    """The model's note as it is kept: one paragraph, at most `MAX_CHARS`."""
    text = re.sub(r"\s+", " ", text).strip()
    return text[:MAX_CHARS]


def head_of(messages: Sequence[ChatMessage]) -> int:
    """How many system messages the conversation starts with."""
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    return head


def with_note(messages: Sequence[ChatMessage], note: str | None) -> tuple[ChatMessage, ...]:
    """`messages` (a conversation's start: its system messages, then turns) with `note`
    after the system prompt."""
    messages = tuple(messages)
    if not note:
        return messages
    text = HEADER + note
    if messages and messages[0].role == "system":
        first = messages[0]
        return (ChatMessage("system", f"{first.content}\n\n{text}"), *messages[1:])
    return (ChatMessage("system", text), *messages)


def request_messages(messages: Sequence[ChatMessage], note: Note | None, end: int
                     ) -> tuple[ChatMessage, ...]:
    """What the model reads to write a new note: the conversation as its slot last held
    it (system prompt with the current note, the turns since), up to message `end`, then
    the instruction."""
    head = head_of(messages)
    start = head + (note.covers if note else 0)
    return (*with_note(messages[:head], note.text if note else None), *messages[start:end],
            ChatMessage("user", INSTRUCTION))


class Notes:
    """The newest note of each (owner, session) this worker wrote or was sent, least
    recently used dropped first past `entries` (each at most `MAX_CHARS`)."""

    def __init__(self, entries: int = 4096) -> None:
        self.entries = entries
        self._notes: OrderedDict[tuple[str, str], Note] = OrderedDict()

    def get(self, owner: str, session: str, messages: Sequence[ChatMessage]) -> Note | None:
        """The note for this conversation, if it still matches its messages."""
        key = (owner, session)
        note = self._notes.get(key)
        if note is None:
            return None
        head = head_of(messages)
        if note.covers >= len(messages) - head or \
                digest(messages[head:head + note.covers]) != note.digest:
            return None
        self._notes.move_to_end(key)
        return note

    def put(self, owner: str, session: str, note: Note) -> None:
        key = (owner, session)
        self._notes[key] = note
        self._notes.move_to_end(key)
        while len(self._notes) > self.entries:
            self._notes.popitem(last=False)

    def __len__(self) -> int:
        return len(self._notes)
