"""Token bytes to chunk texts: UTF-8 across tokens, stop strings, coalescing."""

from __future__ import annotations

import pytest

from pichat.worker.textstream import TextStream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(pieces: list[bytes], **kwargs) -> tuple[list[str], bool]:
    sent: list[str] = []
    stream = TextStream(sent.append, flush_tokens=1, **kwargs)
    stopped = False
    for piece in pieces:
        if stream.push(piece):
            stopped = True
            break
    stream.close()
    assert stream.text == "".join(sent)
    return sent, stopped


def test_a_character_split_across_tokens_is_sent_whole():
    snowman = "☃".encode()
    sent, _ = run([b"a", snowman[:1], snowman[1:2], snowman[2:], b"b"])
    assert "".join(sent) == "a☃b"
    assert all("\ufffd" not in s for s in sent)


def test_invalid_utf8_becomes_a_replacement_character_not_an_exception():
    sent, _ = run([b"ok", b"\xff", b"!"])
    assert "".join(sent) == "ok\ufffd!"


def test_an_unfinished_character_at_the_end_is_flushed_as_replacement():
    sent, _ = run([b"x", "☃".encode()[:2]])
    assert "".join(sent) == "x\ufffd"


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
    assert "".join(sent) == expected
    assert stopped == any(s in "".join(p.decode() for p in pieces) for s in stop)
    for s in stop:
        assert s not in "".join(sent)


def test_held_back_prefix_of_a_stop_string_is_not_sent_early():
    sent: list[str] = []
    stream = TextStream(sent.append, stop=["STOP"], flush_tokens=1)
    stream.push(b"go ST")
    assert "".join(sent) == "go "
    stream.push(b"ay")
    assert "".join(sent) == "go STay"


def test_first_text_goes_out_at_once_then_chunks_coalesce_by_count():
    clock = Clock()
    sent: list[str] = []
    stream = TextStream(sent.append, flush_tokens=4, flush_interval=10.0, clock=clock)
    for i in range(9):
        stream.push(str(i).encode())
    assert sent == ["0", "1234", "5678"]
    stream.close()
    assert sent == ["0", "1234", "5678"]
    stream2 = TextStream(sent.append, flush_tokens=4, flush_interval=10.0, clock=clock)
    for _ in range(3):
        stream2.push(b"x")
    stream2.close()
    assert sent[-2:] == ["x", "xx"]


def test_chunks_coalesce_by_time():
    clock = Clock()
    sent: list[str] = []
    stream = TextStream(sent.append, flush_tokens=100, flush_interval=0.05, clock=clock)
    stream.push(b"a")
    clock.now = 0.01
    stream.push(b"b")
    clock.now = 0.02
    stream.push(b"c")
    assert sent == ["a"]
    clock.now = 0.06
    stream.push(b"d")
    assert sent == ["a", "bcd"]
