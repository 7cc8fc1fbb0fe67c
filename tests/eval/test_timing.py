"""qmamba.eval.timing: what a timed call returns, how often `median_seconds` calls, and the
process memory readings."""

from __future__ import annotations

import time

import pytest

from qmamba.eval.timing import median_seconds, peak_rss, rss, timed


def test_timed_returns_the_result_and_the_wall_time():
    out, seconds = timed(lambda: time.sleep(0.02) or 7)
    assert out == 7
    assert 0.02 <= seconds < 1.0


def test_median_seconds_warms_up_then_takes_the_median():
    calls = []
    delays = iter([0.0, 0.0, 0.03, 0.0, 0.01])          # 2 warm-up calls, then 3 timed ones

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    m = median_seconds(fn, reps=3, warmup=2)
    assert len(calls) == 5
    assert 0.01 <= m < 0.03                               # the middle of (0.03, 0.0, 0.01)
    with pytest.raises(ValueError, match="reps"):
        median_seconds(fn, reps=0)


def test_memory_readings():
    blob = bytearray(64 << 20)                            # 64 MiB, touched
    blob[::4096] = b"x" * len(blob[::4096])
    now, peak = rss(), peak_rss()
    assert now >= 64 << 20 and peak >= now
    del blob
