"""qmamba.eval.inspect.statistics: the SQNR function and the state quantizers' SQNRs on planted
outliers and against a per-tensor quantizer written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qmamba.eval.inspect.statistics import sqnr_db, sqnr_of_states


def test_sqnr_db():
    h = torch.ones(2, 3, 4)
    assert sqnr_db(h, 0.9 * h) == pytest.approx(20.0)
    assert sqnr_db(h, h) == math.inf


def planted(seed=0, m=24, d=32, n=16) -> torch.Tensor:
    """States with outliers along both axes: a few large channels and one large state index."""
    g = torch.Generator().manual_seed(seed)
    ch = torch.ones(d)
    ch[3], ch[17] = 40.0, 8.0
    st = torch.ones(n)
    st[5] = 12.0
    return torch.randn(m, d, n, generator=g) * ch[:, None] * st


def test_dsq_beats_per_tensor_on_planted_outliers():
    s = sqnr_of_states(planted(), bits=4)
    assert s["dsq-dynamic"] >= s["tensor-dynamic"] + 3
    assert s["dsq-dynamic"] >= s["channel-dynamic"] - 1e-9     # DSQ includes per-channel (s_n = 1)
    assert s["dsq-static"] >= s["tensor-static"]


def test_sqnr_matches_manual_per_tensor():
    h = planted(seed=1)
    s = sqnr_of_states(h, bits=4, configs=[("tensor", "dynamic")])["tensor-dynamic"]
    scale = (h.abs().amax((1, 2), keepdim=True) / 7).half().float()
    q = torch.round(h / scale).clamp(-7, 7) * scale
    expected = 10 * math.log10(h.pow(2).sum().item() / (h - q).pow(2).sum().item())
    assert s == pytest.approx(expected, rel=1e-6)
