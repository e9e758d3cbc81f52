"""Context shift (pichat/worker/engine/shift.py): which held tokens a slid prompt can reuse, and
the cell moves that make a sequence hold them, checked against a model of llama.cpp's
rules (a read continues the sequence where it ends; a move shifts every cell in range)."""

from __future__ import annotations

import random

import pytest

from pichat.worker.engine.shift import MIN_REUSE, Splice, apply, plan, settle


def words(n: int, seed: int, vocab: int = 5000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


class Cells:
    """One sequence's KV cells as llama.cpp keeps them: (position, token) pairs."""

    def __init__(self, tokens: list[int]) -> None:
        self.cells = [(p, t) for p, t in enumerate(tokens)]
        self.highest_read = 0

    def remove(self, p0: int, p1: int) -> None:
        hi = p1 if p1 >= 0 else 1 << 60
        self.cells = [(p, t) for p, t in self.cells if not p0 <= p < hi]

    def move(self, p0: int, p1: int, delta: int) -> None:
        self.cells = [(p + delta, t) if p0 <= p < p1 else (p, t) for p, t in self.cells]
        assert all(p >= 0 for p, _ in self.cells)

    def read(self, tokens, pos: int) -> None:
        top = max((p for p, _ in self.cells), default=-1)
        assert pos == top + 1, f"a read at {pos} where the sequence ends at {top}"
        self.highest_read = max(self.highest_read, pos + len(tokens))
        self.cells += [(pos + i, t) for i, t in enumerate(tokens)]

    def tokens(self) -> list[int]:
        ordered = sorted(self.cells)
        assert [p for p, _ in ordered] == list(range(len(ordered))), "positions have gaps"
        return [t for _, t in ordered]


def carry_out(held: list[int], prompt: list[int], splice: Splice) -> Cells:
    cells = Cells(held)
    apply(splice, remove=cells.remove, move=cells.move, read=cells.read, prompt=prompt)
    settle(splice, remove=cells.remove, read=cells.read, prompt=prompt)
    return cells


@pytest.mark.parametrize("a,x,z,k,y,w", [
    (20, 100, 0, 300, 5, 12),     # turns left, nothing in their place
    (20, 100, 40, 300, 5, 12),    # a note shorter than what left
    (20, 30, 120, 300, 0, 12),    # a note longer than what left
    (20, 0, 40, 300, 5, 12),      # a note appears, nothing left (yet)
    (0, 80, 30, 200, 9, 1),       # no common start at all
    (15, 200, 60, 33, 70, 40),    # a short kept run, a long tail
])
def test_a_slid_prompt_reuses_the_kept_run_and_the_cells_end_up_in_prompt_order(a, x, z, k, y, w):
    A, X, Z = words(a, 1), words(x, 2), words(z, 3)
    K, Y, W = words(k, 4), words(y, 5), words(w, 6)
    if a:
        X = [A[-1] + 1, *X[1:]] if X else X  # X differs from the prompt right after A
    held, prompt = A + X + K + Y, A + Z + K + W
    splice = plan(held, prompt)
    assert splice is not None
    assert splice.keep >= a and splice.length >= k - 1 and splice.reused >= a + z + k - 1
    cells = carry_out(held, prompt, splice)
    assert cells.tokens() == prompt[:splice.reused]
    assert cells.highest_read <= len(prompt)  # never past the prompt while reading


def test_the_true_run_is_found_among_repeated_phrases():
    # An answer that repeats itself: its grams occur in many places of the prompt, and
    # the first place a gram occurs is not where the kept turns are.
    phrase = words(12, 7)
    A, X = words(10, 8), words(60, 9)
    K = [t for i in range(20) for t in (phrase + words(3, 100 + i))]
    held = A + X + K
    prompt = A + phrase * 3 + K + words(5, 10)
    splice = plan(held, prompt)
    assert splice is not None and splice.length == len(K)
    assert splice.cut == len(A) + len(X) and splice.at == len(A) + 3 * len(phrase)
    assert carry_out(held, prompt, splice).tokens() == prompt[:splice.reused]


def test_nothing_to_move_gives_no_splice():
    A = words(50, 11)
    assert plan(A + words(20, 12), A + words(20, 13)) is None  # only the start in common
    assert plan(A, A + words(5, 14)) is None  # the prompt continues the held tokens
    short = words(MIN_REUSE - 1, 15)
    assert plan(A + words(40, 16) + short, A + short + words(3, 17)) is None


def test_the_prompts_last_token_is_always_read():
    A, X, K = words(10, 18), words(50, 19), words(100, 20)
    held, prompt = A + X + K, A + K  # the prompt ends where the held tokens end
    splice = plan(held, prompt)
    assert splice is not None and splice.reused == len(prompt) - 1


def test_random_slides_always_leave_cells_in_prompt_order():
    rng = random.Random(42)
    for case in range(200):
        seed = case * 10
        a, x, z = rng.randrange(0, 40), rng.randrange(0, 200), rng.randrange(0, 150)
        k, y, w = rng.randrange(MIN_REUSE, 400), rng.randrange(0, 50), rng.randrange(1, 30)
        held = words(a, seed) + words(x, seed + 1) + (K := words(k, seed + 2)) + words(y, seed + 3)
        prompt = held[:a] + words(z, seed + 4) + K + words(w, seed + 5)
        splice = plan(held, prompt)
        if splice is None:
            continue
        cells = carry_out(held, prompt, splice)
        assert cells.tokens() == prompt[:splice.reused], case
        assert splice.reused < len(prompt)
