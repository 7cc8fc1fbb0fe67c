"""qmamba.eval.timing: what a timed call returns, how often `median_seconds` calls, and the
process memory readings."""

from __future__ import annotations

import time

import pytest

from qmamba.eval.timing import decode_step_seconds, median_seconds, peak_rss, rss, timed


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


def test_decode_step_seconds_times_each_greedy_step(tiny_mamba2):
    """One time per token step, and the logits of the greedy decode the model itself gives."""
    import torch

    import qmamba
    model = qmamba.load(tiny_mamba2[1]).model
    prompt = torch.arange(10).reshape(2, 5) % model.config.vocab_size
    seconds, logits, cache = decode_step_seconds(model, prompt, 4)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    ref_cache = model.allocate_cache(2)
    tok = model(prompt, ref_cache, logits_to_keep=1)[:, -1].argmax(-1)
    for t in range(4):
        y = model.step(tok, ref_cache)
        assert torch.equal(logits[t], y)
        tok = y.argmax(-1)
    assert cache is not None
