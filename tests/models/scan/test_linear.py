"""`qmamba.models.scan.linear`: the chunked linear scan against its sequential reference, values
and gradients (a, u, h0), with a coefficient that broadcasts over the state."""

from __future__ import annotations

import pytest
import torch

from qmamba.models.scan.linear import linear_scan, linear_scan_ref

from .scan_checks import LENGTHS, assert_close, grads, probe


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("broadcast", [False, True])
def test_linear_scan_matches_reference(length, with_h0, broadcast):
    g = torch.Generator().manual_seed(length)
    b, s1, s2 = 2, 3, 4
    a = torch.rand(b, length, 1 if broadcast else s1, s2, generator=g).requires_grad_()
    u = torch.randn(b, length, s1, s2, generator=g).requires_grad_()
    h0 = torch.randn(b, s1, s2, generator=g).requires_grad_() if with_h0 else None
    leaves = [t for t in (a, u, h0) if t is not None]
    out = linear_scan(a, u, h0)
    ref = linear_scan_ref(a, u, h0)
    assert_close(out, ref, name="h")
    w = probe(ref)
    got, want = grads((out * w).sum(), leaves), grads((ref * w).sum(), leaves)
    for name, gv, wv in zip("a u h0".split(), got, want):
        assert_close(gv, wv, name=name)
