"""Which part of a conversation the context holds: a conversation that no longer fits
slides instead of failing.

The system messages at its start stay, and so does the newest turn; the oldest turns
(a user message with the answers after it, never half of one: chat templates want roles
to alternate) leave, in blocks: enough of them to free the overflow rounded up to a whole
`block` of tokens (a quarter of the context). The same conversation a turn longer then
drops the same turns until its overflow passes the next block, so the prompt's start
stays the same for many turns and its KV state keeps being reused, where dropping just
enough every turn would change the start, and re-read everything, every turn.

Pure: `count` says how many tokens a list of messages takes in the model's template (the
model's tokenizer; called a few times: a binary search over where to cut).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pichat.errors import ContextTooLong
from pichat.protocol import ChatMessage

__all__ = ["Window", "slide"]


@dataclass(frozen=True, slots=True)
class Window:
    messages: tuple[ChatMessage, ...]
    """What the model reads."""
    dropped: int = 0
    """Messages left out (the oldest, after the system messages)."""
    dropped_tokens: int = 0
    """The tokens that freed."""


def slide(messages: Sequence[ChatMessage], *, count: Callable[[Sequence[ChatMessage]], int],
          n_ctx: int, reserve: int, block: int) -> Window:
    """The messages that fit `n_ctx` tokens with `reserve` left for the answer. Raises
    ContextTooLong when even the system messages and the newest turn do not."""
    messages = tuple(messages)
    total = count(messages)
    overflow = total + reserve - n_ctx
    if overflow <= 0:
        return Window(messages)
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    starts = [i for i in range(head, len(messages)) if messages[i].role == "user"]
    cuts = starts[1:] if starts and starts[0] == head else starts  # where a drop may end

    def freed(cut: int) -> int:
        return total - count(messages[:head] + messages[cut:])

    if not cuts or freed(cuts[-1]) < overflow:  # the newest turn alone does not fit
        kept = count(messages[:head] + messages[cuts[-1] if cuts else head:])
        raise ContextTooLong(
            f"the newest message and the system prompt take {kept} tokens, and the model's "
            f"context holds {n_ctx} with {reserve} kept for the answer: shorten the message "
            "or the system prompt, ask for fewer max_tokens, or start the worker with a "
            "larger --ctx")
    target = math.ceil(overflow / block) * block
    lo, hi = 0, len(cuts) - 1  # the fewest whole turns that free `target` (or all but one)
    while lo < hi:
        mid = (lo + hi) // 2
        if freed(cuts[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    cut = cuts[lo]
    return Window(messages[:head] + messages[cut:], cut - head, freed(cut))
