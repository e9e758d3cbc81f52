"""Log lines a peer cannot blow up: clipped values, repeats summed up per window."""

from __future__ import annotations

import logging

from pichat.logs import Throttle, clip


def test_clip_bounds_any_value():
    assert clip("short") == "short"
    long = clip("x" * 10_000, 50)
    assert len(long) < 80 and "10000 chars" in long
    assert clip(b"\xff" * 1000, 20).startswith("b'\\xff")


def test_repeats_within_a_window_are_counted_then_summed_up_once(caplog):
    throttle = Throttle(logging.getLogger("t"), window=10.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(500):
            throttle.log(1.0 + i * 0.01, logging.WARNING, "refused", "refused a peer from %s",
                         f"10.0.0.{i % 250}", detail=f"10.0.0.{i % 250}")
        throttle.log(2.0, logging.WARNING, "other", "another kind")
        throttle.flush(5.0)     # the window has not ended: nothing more yet
        assert len(caplog.records) == 2
        throttle.flush(11.5)    # it has: one summary line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "refused a peer from 10.0.0.0"
    assert lines[2].startswith('499 more like "refused a peer from 10.0.0.0"')
    assert "first 10.0.0.1, last 10.0.0.249" in lines[2]
    assert throttle.suppressed == 499


def test_the_kinds_remembered_are_bounded():
    throttle = Throttle(logging.getLogger("t"), window=60.0, max_kinds=8)
    for i in range(1000):
        throttle.log(0.0, logging.INFO, f"kind {i}", "x")
    assert len(throttle._windows) <= 8
