"""Context shift: reuse the KV state of a conversation whose start slid out.

A context holds `held` (the tokens of the last turn); the new `prompt` keeps the same
start `A` (the system prompt), leaves out a span `X` (the oldest turns that slid out,
pichat/worker/store/window.py), may put something new `Z` in its place (the memory of what
left, or nothing), then goes on with a long run `K` the context already holds (the kept
turns) and ends with what is new `W` (the new user message):

    held   = A X K Y        (Y: what the context holds after K that the prompt does not)
    prompt = A Z K W

Instead of reading `Z K W` (`K` is most of the context: seconds here, minutes on a Pi),
the context removes `X` and `Y` from its cells, moves `K` to its new positions (llama.cpp
re-rotates the keys: `llama_memory_seq_add`), evaluates `Z`, and reads only `W`. The
cells of `K` were computed after `X` and those of `Z` after `K` (a sequence only grows at
its end: llama.cpp requires each batch to continue a sequence where it ends, so `Z` is
evaluated after `K` and moved in front of it), which is the approximation llama.cpp's
own context shift makes: every later token still attends to `A Z K` in that order.

`plan` is pure; the backends (pichat/worker/engine/batch.py, pichat/worker/engine/llama.py) carry it
out with `apply`: every position it uses while reading stays below the prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pichat.worker.engine.backend import common_prefix

__all__ = ["Splice", "plan", "apply", "settle", "MIN_REUSE"]

MIN_REUSE = 32
"""A run of held tokens shorter than this is read again rather than moved."""

_GRAM = 8
"""Tokens matched at once when looking for `K` in the prompt."""

_PLACES = 32
"""Places of one gram in the prompt looked at (bounds the work on a repetitive prompt)."""


@dataclass(frozen=True, slots=True)
class Splice:
    keep: int
    """Tokens kept where they are (`A`)."""
    cut: int
    """Where `K` starts in `held` (`X` is held[keep:cut])."""
    length: int
    """Tokens of `K`."""
    at: int
    """Where `K` starts in the prompt (`Z` is prompt[keep:at])."""

    @property
    def reused(self) -> int:
        """Tokens of the prompt the context holds after the splice (`A Z K`)."""
        return self.at + self.length


def plan(held: Sequence[int], prompt: Sequence[int], *, min_reuse: int = MIN_REUSE
         ) -> Splice | None:
    """The splice that reuses the longest run of `held` beyond its common start with
    `prompt`, or None if no run of at least `min_reuse` tokens is found. The prompt's last
    token is never part of `K` (it is read, for the first answer token).

    Runs are found from matching `_GRAM`-token grams, each measured once along its
    diagonal (a conversation repeats itself: a gram may occur in many places, and the
    first match is often not `K`)."""
    keep = common_prefix(held, prompt)
    end = len(prompt) - 1
    if len(held) - keep < min_reuse or end - keep < min_reuse:
        return None
    where: dict[tuple[int, ...], list[int]] = {}
    for i in range(end - _GRAM, keep - 1, -1):  # the latest places: K is near the end
        places = where.setdefault(tuple(prompt[i:i + _GRAM]), [])
        if len(places) < _PLACES:
            places.append(i)
    reach: dict[int, int] = {}  # diagonal (i - j) -> where its last run found ends in held
    best: tuple[int, int, int] | None = None  # (length, j, i)
    for j in range(keep, len(held) - _GRAM + 1):
        for i in where.get(tuple(held[j:j + _GRAM]), ()):
            d = i - j
            if j < reach.get(d, -1):
                continue  # inside a run already measured
            n = _GRAM
            while j + n < len(held) and i + n < end and held[j + n] == prompt[i + n]:
                n += 1
            reach[d] = j + n
            if best is None or n > best[0]:
                best = (n, j, i)
    if best is None or best[0] < min_reuse:
        return None
    n, j, i = best
    return Splice(keep, j, n, i)


def apply(splice: Splice, *, remove: Callable[[int, int], Any],
          move: Callable[[int, int, int], Any], read: Callable[[Sequence[int], int], Any],
          prompt: Sequence[int]) -> None:
    """Carry `splice` out on one sequence whose cells sit at positions 0, 1, 2...:
    `remove(p0, p1)` drops the cells in [p0, p1) (p1 -1: to the end), `move(p0, p1, delta)`
    shifts them,
    `read(tokens, pos)` evaluates tokens from position `pos` on (the sequence's end).
    Afterwards the sequence holds prompt[:splice.reused] at positions 0..reused-1."""
    keep, cut, n, at = splice.keep, splice.cut, splice.length, splice.at
    remove(cut + n, -1)  # Y, and any cells past what is held
    remove(keep, cut)  # X
    if cut != keep:
        move(cut, cut + n, keep - cut)  # K, down to right after A
    z = at - keep
    if z == 0:
        return
    # Z is read where the sequence ends (after K), then K and Z trade places: Z first out
    # of the way (past anything), so that no move catches cells of the other.
    end = keep + n
    read(prompt[keep:at], end)
    far = end + splice.reused  # past where K ends up
    move(end, end + z, far - end)
    move(keep, end, z)
    move(far, far + z, keep - far)


def settle(splice: Splice, *, remove: Callable[[int, int], Any],
           read: Callable[[Sequence[int], int], Any], prompt: Sequence[int]) -> None:
    """Make llama.cpp rotate the moved cells now rather than at the sequence's next
    decode (a state saved before that would hold them unrotated): read the last held
    token again."""
    last = splice.reused - 1
    remove(last, last + 1)
    read(prompt[last:last + 1], last)
