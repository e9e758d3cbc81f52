"""A conversation too long for the context slides (pichat/worker/store/window.py): the oldest
whole turns leave in blocks, so the prompt's start holds still for many turns."""

from __future__ import annotations

import pytest

from pichat.errors import ContextTooLong
from pichat.protocol import ChatMessage
from pichat.worker.store.window import slide


def weigh(m: ChatMessage) -> int:
    return len(m.content.split()) + 2


def count(messages) -> int:
    return 1 + sum(weigh(m) for m in messages)


def conversation(turns: int, words: int = 18) -> list[ChatMessage]:
    out = [ChatMessage("system", "You are terse.")]
    for t in range(turns):
        out += [ChatMessage("user", f"q{t} " + "w " * (words - 1)),
                ChatMessage("assistant", f"a{t} " + "w " * (words - 1))]
    return out + [ChatMessage("user", "and now?")]


def fit(messages, n_ctx=400, reserve=50, block=100):
    return slide(messages, count=count, n_ctx=n_ctx, reserve=reserve, block=block)


def test_a_conversation_that_fits_is_left_alone():
    messages = conversation(3)
    window = fit(messages)
    assert window.messages == tuple(messages) and window.dropped == 0


def test_the_oldest_whole_turns_leave_and_the_system_prompt_and_newest_stay():
    messages = conversation(12)  # 1 + 6 + 24 x 20 + 4 = 491 tokens: 141 over
    window = fit(messages)
    kept = window.messages
    assert kept[0].role == "system" and kept[-1].content == "and now?"
    assert kept[1].role == "user"  # whole turns: roles still alternate
    assert count(kept) + 50 <= 400
    assert window.dropped % 2 == 0 and window.dropped_tokens >= 200  # two blocks of 100
    assert window.dropped_tokens == count(messages) - count(kept)
    assert [m.content for m in messages[1 + window.dropped:]] == [m.content for m in kept[1:]]


def moves(block: int) -> int:
    """How often the kept prompt's start changes over 20 more turns of 40 tokens."""
    starts = [fit(conversation(turns), block=block).messages[1].content.split()[0]
              for turns in range(10, 30)]
    return sum(a != b for a, b in zip(starts, starts[1:]))


def test_the_start_holds_still_for_turns_then_moves_a_block_at_once():
    # Dropping just enough moves the start on every turn; a block of 100 tokens lasts
    # 2-3 turns of 40 (a quarter of a real context lasts many more).
    assert moves(block=1) == 19
    assert moves(block=100) <= 8
    assert moves(block=200) <= 4


def test_a_newest_message_too_long_alone_is_still_an_error():
    messages = [ChatMessage("system", "s"), ChatMessage("user", "x " * 500)]
    with pytest.raises(ContextTooLong, match="shorten the message .* larger --ctx"):
        fit(messages)


def test_past_the_last_block_all_but_the_newest_turn_may_go():
    window = fit(conversation(30), n_ctx=400, block=10_000)  # a block bigger than it all
    assert [m.role for m in window.messages] == ["system", "user"]
    assert window.dropped == 60
