"""`qmamba.models.scan.ssd`: the Mamba2 chunked SSD scan against the per-channel sequential
reference (per-head A and dt expanded per channel, several groups), values and gradients."""

from __future__ import annotations

import pytest
import torch

from qmamba.models.scan.reference import selective_scan_ref
from qmamba.models.scan.ssd import ssd_scan

from .scan_checks import assert_close, grads, probe


@pytest.mark.parametrize("length, chunk, groups, with_h0", [
    (16, 8, 1, False), (37, 8, 2, True), (5, 8, 2, False), (24, 8, 4, True),
])
def test_ssd_scan_matches_per_channel_reference(length, chunk, groups, with_h0):
    g = torch.Generator().manual_seed(length + groups)
    b, nh, p, n = 2, 4, 3, 5
    d = nh * p
    x = torch.randn(b, length, nh, p, generator=g).requires_grad_()
    dt = (torch.rand(b, length, nh, generator=g) * 0.5 + 0.01).requires_grad_()
    A = (-(torch.rand(nh, generator=g) * 2 + 0.1)).requires_grad_()
    B = torch.randn(b, length, groups, n, generator=g).requires_grad_()
    C = torch.randn(b, length, groups, n, generator=g).requires_grad_()
    D = torch.randn(nh, generator=g).requires_grad_()
    h0 = torch.randn(b, nh, p, n, generator=g).requires_grad_() if with_h0 else None
    leaves = [t for t in (x, dt, A, B, C, D, h0) if t is not None]

    y, h = ssd_scan(x, dt, A, B, C, D, chunk, h0)
    # the same recurrence per channel: A and dt of a head shared by its p channels
    y_ref, h_ref = selective_scan_ref(
        x.reshape(b, length, d), dt.repeat_interleave(p, dim=-1), A.repeat_interleave(p)[:, None], B, C,
        D.repeat_interleave(p), None if h0 is None else h0.reshape(b, d, n))
    y_ref, h_ref = y_ref.view(b, length, nh, p), h_ref.view(b, nh, p, n)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="h")

    def loss(y, h):
        return (y * probe(y)).sum() + (h * probe(h, 1.0)).sum()

    got, want = grads(loss(y, h), leaves), grads(loss(y_ref, h_ref), leaves)
    for name, gv, wv in zip("x dt A B C D h0".split(), got, want):
        assert_close(gv, wv, name=name)
