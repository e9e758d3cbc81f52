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


def test_a_value_from_the_network_cannot_write_a_line_of_its_own(tmp_path):
    """The daemons' formatter (setup_logging's): newlines, carriage returns, Unicode line
    separators and bidi overrides in any logged value are escaped; our own tracebacks keep
    their lines."""
    import subprocess
    import sys
    forged = ("pi9\n12:00:00 I [router] pichat.router.daemon.joins: worker admin joined"
              "\r\u2028\u202e")
    script = (
        "import logging, sys\n"
        "from pichat.cli.options import setup_logging\n"
        "setup_logging('info', 'router')\n"
        "logging.getLogger('pichat.router.daemon.joins')"
        ".warning('join refused (%s)', sys.argv[1])\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('x').exception('failed')\n")
    err = subprocess.run([sys.executable, "-c", script, forged], capture_output=True,
                         text=True, timeout=60, check=True).stderr
    lines = err.splitlines()
    assert lines[0].endswith(
        "join refused (pi9\\x0a12:00:00 I [router] pichat.router.daemon.joins: worker admin "
        "joined\\x0d\\u2028\\u202e)")
    assert not any("worker admin joined" in line for line in lines[1:])
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"
