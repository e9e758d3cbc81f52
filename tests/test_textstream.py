"""Token bytes to chunks: UTF-8 across tokens, stop strings, coalescing, and text/token
alignment (what a mid-stream failover relies on)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pichat.worker.engine.textstream import TextStream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sent(list):
    def __call__(self, text: str, tokens: tuple[int, ...]) -> None:
        self.append((text, tokens))

    @property
    def texts(self) -> list[str]:
        return [t for t, _ in self]

    @property
    def text(self) -> str:
        return "".join(self.texts)


def run(pieces: list[bytes], **kwargs) -> tuple[Sent, bool]:
    sent = Sent()
    stream = TextStream(sent, flush_tokens=1, **kwargs)
    stopped = False
    for token, piece in enumerate(pieces, 1):
        if stream.push(piece, token):
            stopped = True
            break
    stream.close()
    assert stream.text == sent.text
    return sent, stopped


def test_a_character_split_across_tokens_is_sent_whole_with_its_tokens():
    snowman = "☃".encode()
    sent, _ = run([b"a", snowman[:1], snowman[1:2], snowman[2:], b"b"])
    assert sent == [("a", (1,)), ("☃", (2, 3, 4)), ("b", (5,))]


def test_invalid_utf8_becomes_a_replacement_character_not_an_exception():
    sent, _ = run([b"ok", b"\xff", b"!"])
    assert sent.text == "ok\ufffd!"


def test_an_unfinished_character_at_the_end_is_flushed_as_replacement():
    sent, _ = run([b"x", "☃".encode()[:2]])
    assert sent.text == "x\ufffd"


@pytest.mark.parametrize("pieces, stop, expected", [
    ([b"Hello", b" wor", b"ld", b"!"], ["world"], "Hello "),
    ([b"Hel", b"lo", b"\n", b"\n", b"more"], ["\n\n"], "Hello"),
    ([b"ab", b"c"], ["abc"], ""),
    ([b"a", b"b", b"x"], ["abc"], "abx"),          # a partial match that fails is released
    ([b"one", b" two"], ["zzz"], "one two"),
    ([b"one END two"], ["END", "one"], ""),         # the earliest stop wins
])
def test_stop_strings_are_never_sent_even_in_part(pieces, stop, expected):
    sent, stopped = run(pieces, stop=stop)
    assert sent.text == expected
    assert stopped == any(s in "".join(p.decode() for p in pieces) for s in stop)
    for s in stop:
        assert s not in sent.text


def test_text_that_may_start_a_stop_string_waits_with_its_token():
    sent = Sent()
    stream = TextStream(sent, stop=["STOP"], flush_tokens=1)
    stream.push(b"go ST", 1)
    assert sent == []  # "ST" might be the start of STOP: token 1 is not wholly out
    stream.push(b"ay", 2)
    assert sent == [("go STay", (1, 2))]


def test_first_text_goes_out_at_once_then_chunks_coalesce_by_count():
    clock = Clock()
    sent = Sent()
    stream = TextStream(sent, flush_tokens=4, flush_interval=10.0, clock=clock)
    for i in range(9):
        stream.push(str(i).encode(), i)
    assert sent.texts == ["0", "1234", "5678"]
    assert sent[1][1] == (1, 2, 3, 4)
    stream.close()
    assert sent.texts == ["0", "1234", "5678"]


def test_chunks_coalesce_by_time():
    clock = Clock()
    sent = Sent()
    stream = TextStream(sent, flush_tokens=100, flush_interval=0.05, clock=clock)
    stream.push(b"a", 1)
    clock.now = 0.01
    stream.push(b"b", 2)
    clock.now = 0.02
    stream.push(b"c", 3)
    assert sent.texts == ["a"]
    clock.now = 0.06
    stream.push(b"d", 4)
    assert sent == [("a", (1,)), ("bcd", (2, 3, 4))]


pieces = st.lists(st.one_of(
    st.sampled_from([b"a", b" ", b"ST", b"OP", b"\n", "é".encode(), "☃".encode(), b"\xe2",
                     b"\x98", b"\x83", b"\xff", b"", b"word"]),
    st.binary(max_size=3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(pieces=pieces, stop=st.sampled_from([(), ("STOP",), ("\n\n", "OP")]),
       flush_tokens=st.integers(1, 5))
def test_every_chunk_holds_exactly_the_text_of_its_tokens(pieces, stop, flush_tokens):
    """Replaying the tokens of chunks 1..k through a fresh decoder gives exactly the text
    of chunks 1..k: a worker continuing after those tokens neither repeats nor skips."""
    sent = Sent()
    stream = TextStream(sent, stop=stop, flush_tokens=flush_tokens)
    for token, piece in enumerate(pieces):
        if stream.push(piece, token):
            break
    if stream.stopped:
        return  # the answer ended: no continuation after a stop string
    delivered_text, delivered_tokens = "", []
    for text, tokens in sent:  # only chunks sent during generation (before close)
        delivered_text += text
        delivered_tokens += tokens
        replay = b"".join(pieces[t] for t in delivered_tokens).decode("utf-8", "replace")
        assert replay == delivered_text
        assert delivered_tokens == list(range(len(delivered_tokens)))
