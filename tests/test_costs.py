"""The spill cost model's parts (pichat/router/policy/costs.py); the decisions built on them are
table cases in tests/test_scheduler.py."""

from __future__ import annotations

import pytest

from pichat.router.policy.costs import (
    DEFAULT_PROMPT_TPS,
    Estimates,
    SlotClock,
    Speed,
    bring_seconds,
    left_seconds,
    move_beats_read,
)
from pichat.router.policy.records import Job

PI = Speed(prompt_tps=15, decode_tps=4, kv_token_bytes=110_000, state_format="llama3b")
GIGABIT = 110e6


def test_a_slot_clock_serves_queued_requests_in_turn_on_the_first_free_slot():
    clock = SlotClock(2, [5.0, 1.0])
    assert clock.next_free() == 1.0
    clock.take(3.0)                  # takes the slot free at 1: busy until 4
    assert clock.next_free() == 4.0
    clock.take(10.0)                 # until 14
    assert clock.next_free() == 5.0
    assert SlotClock(3, [2.0]).next_free() == 0.0  # a slot is free now


def test_a_pi_moves_a_long_history_rather_than_read_it_again():
    # 2,000 tokens: read at 15/s is 133 s; 220 MB over gigabit is 2 s.
    seconds = bring_seconds(2000, PI, PI, GIGABIT, migrate=True)
    assert 1.9 < seconds < 2.2
    assert bring_seconds(2000, PI, PI, GIGABIT, migrate=False) == pytest.approx(2000 / 15)


def test_a_fast_reader_on_a_slow_link_reads_again():
    fast = Speed(prompt_tps=5000, kv_token_bytes=110_000, state_format="f")
    assert not move_beats_read(fast, fast, 1e6)
    assert bring_seconds(1000, fast, fast, 1e6, migrate=True) == pytest.approx(0.2)


def test_states_move_only_between_equal_formats():
    other = Speed(prompt_tps=15, kv_token_bytes=110_000, state_format="qwen")
    assert not move_beats_read(PI, other, GIGABIT)
    assert not move_beats_read(Speed(), Speed(), GIGABIT)  # no format: nothing moves


def test_an_unmeasured_target_of_the_same_format_reads_as_fast_as_the_source():
    fresh = Speed(kv_token_bytes=110_000, state_format="llama3b")
    assert bring_seconds(1500, PI, fresh, GIGABIT, migrate=False) == pytest.approx(100)
    stranger = Speed()
    assert bring_seconds(1500, PI, stranger, GIGABIT, migrate=False) == pytest.approx(
        1500 / DEFAULT_PROMPT_TPS)


def _job(**fields) -> Job:
    return Job(id="r", session=None, model=None, arrived=0, queue_deadline=9, deadline=9,
               spill_at=9, **fields)


def test_work_left_in_a_running_request():
    est = Estimates(answer_tokens=100)
    speed = Speed(prompt_tps=100, decode_tps=10)
    reading = _job(started=0.0, read_tokens=300)
    assert left_seconds(reading, speed, est, now=1.0) == pytest.approx(2 + 10)
    assert left_seconds(_job(started=0.0, read_tokens=300), speed, est, now=9) == 10
    capped = _job(started=0.0, read_tokens=0, max_tokens=20)
    assert left_seconds(capped, speed, est, now=0) == pytest.approx(2)
    writing = _job(tokens_out=60)
    assert left_seconds(writing, speed, est, now=5) == pytest.approx(4)
    overdue = _job(tokens_out=400)   # past its expected length: a few tokens more
    assert 0 < left_seconds(overdue, speed, est, now=5) < 1
    assert left_seconds(_job(abandoned=True), speed, est, now=5) == 0


def test_estimates_follow_what_finished_requests_show():
    est = Estimates()
    for _ in range(40):
        est.learn(prompt_chars=1000, prompt_tokens=250, answer_tokens=40)
    assert est.tokens_per_char == pytest.approx(0.25, rel=0.01)
    assert est.answer_tokens == pytest.approx(40, rel=0.01)
    est.learn(prompt_chars=0, prompt_tokens=0, answer_tokens=0)  # nothing to learn from
    assert est.tokens_per_char == pytest.approx(0.25, rel=0.01)
    for _ in range(40):  # a worker that lies: clamped to what a tokenizer could make
        est.learn(prompt_chars=1, prompt_tokens=10**9, answer_tokens=40)
    assert est.tokens_per_char == pytest.approx(2.0, rel=0.01)
    for _ in range(20):
        est.learn_link(100_000_000, 1.0)
    assert est.link_bps == pytest.approx(100e6, rel=0.01)
    assert est.answer(16) == 16 and est.answer(0) == est.answer_tokens
