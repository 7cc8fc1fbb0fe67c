"""Shared by the tests of `qmamba.eval.inspect`: eager execution and the quantization points
each architecture's probe records."""

from __future__ import annotations

import pytest

POINTS = {"mamba2": {"in_proj", "conv", "x", "dt", "B", "C", "z", "out_proj"},
          "mamba1": {"in_proj", "conv", "x", "dt_proj", "dt", "B", "C", "z", "out_proj"}}


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@pytest.fixture
def points():
    """arch -> the quantization points whose activations the probe records."""
    return POINTS
