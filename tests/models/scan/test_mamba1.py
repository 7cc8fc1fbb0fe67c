"""`qmamba.models.scan.mamba1`: the fused Mamba1 `selective_scan` (forward and every gradient,
all chunk lengths, with and without h0) and the end-state-only scan against the sequential
reference `selective_scan_ref`."""

from __future__ import annotations

import math

import pytest
import torch

from qmamba.models.scan.linear import linear_scan_ref
from qmamba.models.scan.mamba1 import (
    _Mamba1EndStates, _mamba1_scan, chunk_end_states, selective_chunk_len, selective_scan,
)
from qmamba.models.scan.reference import selective_scan_ref

from .scan_checks import LENGTHS, assert_close, grads, probe


def mamba1_inputs(b, length, d, n, with_h0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        x=torch.randn(b, length, d, generator=g, dtype=dtype),
        dt=torch.rand(b, length, d, generator=g, dtype=dtype) * 0.5 + 0.01,
        A=-(torch.rand(d, n, generator=g, dtype=dtype) * 3 + 0.1),
        B=torch.randn(b, length, 1, n, generator=g, dtype=dtype),
        C=torch.randn(b, length, 1, n, generator=g, dtype=dtype),
        D=torch.randn(d, generator=g, dtype=dtype),
        h0=torch.randn(b, d, n, generator=g, dtype=dtype) if with_h0 else None,
    )
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def check_mamba1(fn, inp, use_y=True, use_h=True, rtol=1e-5):
    """fn(x, dt, A, B, C, D, h0) -> (y, h_l): outputs and every gradient against autograd
    through `selective_scan_ref`."""
    leaves = [inp[k] for k in NAMES if inp[k] is not None]
    args = [inp[k] for k in NAMES]
    y, h = fn(*args)
    y_ref, h_ref = selective_scan_ref(*args)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert_close(y, y_ref, rtol, "y")
    assert_close(h, h_ref, rtol, "h")

    def loss(y, h):
        return use_y * (y * probe(y)).sum() + use_h * (h * probe(h, 1.0)).sum()

    got, want = grads(loss(y, h), leaves), grads(loss(y_ref, h_ref), leaves)
    for name, gv, wv in zip([k for k in NAMES if inp[k] is not None], got, want):
        if wv is None:
            assert gv is None or gv.abs().max() == 0, name
        else:
            assert_close(gv, wv, rtol, name)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_matches_reference(length, with_h0):
    check_mamba1(selective_scan, mamba1_inputs(2, length, 6, 4, with_h0, seed=length))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16, 64])
def test_selective_scan_every_chunk_length(k):
    """One chunk per step (k = 1), ragged last chunk, a single chunk longer than l (k = 64)."""
    inp = mamba1_inputs(2, 37, 5, 3, with_h0=True, seed=k)

    def fn(x, dt, A, B, C, D, h0):
        return _mamba1_scan(x.float(), dt, A, B[:, :, 0], C[:, :, 0], D, h0, k)

    check_mamba1(fn, inp)


@pytest.mark.parametrize("use_y, use_h", [(True, False), (False, True)])
def test_selective_scan_one_output_unused(use_y, use_h):
    check_mamba1(selective_scan, mamba1_inputs(1, 23, 4, 3, with_h0=True, seed=3), use_y, use_h)


def test_selective_scan_no_D_and_low_precision_inputs():
    inp = mamba1_inputs(2, 19, 4, 3, with_h0=False, seed=5)
    inp["D"] = None
    check_mamba1(selective_scan, inp)
    x, dt, B, C = (inp[k].detach().bfloat16() for k in ("x", "dt", "B", "C"))
    y, h = selective_scan(x, dt, inp["A"].detach(), B, C, None)
    y_ref, h_ref = selective_scan_ref(x, dt, inp["A"].detach(), B, C, None)
    assert y.dtype == h.dtype == torch.float32
    assert_close(y, y_ref, name="y bf16")
    assert_close(h, h_ref, name="h bf16")


def test_selective_scan_without_grad_matches_with_grad():
    inp = mamba1_inputs(2, 45, 6, 4, with_h0=True, seed=7)
    args = [inp[k] for k in NAMES]
    y1, h1 = selective_scan(*args)
    with torch.no_grad():
        y2, h2 = selective_scan(*args)
    assert not y2.requires_grad
    assert torch.equal(y1.detach(), y2) and torch.equal(h1.detach(), h2)


def test_selective_scan_float64_gradcheck():
    """The fused scan keeps the dtype it is given: finite differences in float64."""
    inp = mamba1_inputs(1, 7, 2, 3, with_h0=True, dtype=torch.float64, seed=11)

    def fn(x, dt, A, B, C, D, h0):
        return _mamba1_scan(x, dt, A, B, C, D, h0, 2)

    args = (inp["x"], inp["dt"], inp["A"], inp["B"][:, :, 0].detach().requires_grad_(),
            inp["C"][:, :, 0].detach().requires_grad_(), inp["D"], inp["h0"])
    assert fn(*args)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_selective_scan_float64_against_float64_recurrence():
    """In float64 the fused scan agrees with the recurrence (built from `linear_scan_ref`) to
    float64 rounding: the float32 tolerances above are not hiding a systematic error."""
    inp = mamba1_inputs(2, 50, 5, 4, with_h0=True, dtype=torch.float64, seed=13)
    x, dt, A, B, C, D, h0 = (inp[k].detach() for k in NAMES)
    y, h = _mamba1_scan(x, dt, A, B[:, :, 0], C[:, :, 0], D, h0, 8)
    hs = linear_scan_ref(torch.exp(dt[..., None] * A), (dt * x)[..., None] * B, h0)   # (b, l, d, n)
    assert_close(y, (hs * C).sum(-1) + D * x, 1e-12, "y")
    assert_close(h, hs[:, -1], 1e-12, "h")


@pytest.mark.parametrize("length", (1, 7, 37))
def test_chunk_end_states_match_the_reference_final_state(length):
    """The end-state-only scan (ESR's first pass) against the final state of the sequential
    recurrence from zero: value and the gradients of x, dt, A and B."""
    inp = mamba1_inputs(3, length, 6, 4, with_h0=False, seed=length)
    leaves = [inp[k] for k in ("x", "dt", "A", "B")]
    h = chunk_end_states(*leaves)
    h_ref = selective_scan_ref(*leaves, inp["C"], None)[1]
    assert h.shape == h_ref.shape == (3, 6, 4)
    assert_close(h, h_ref, name="h")
    for name, got, want in zip(("x", "dt", "A", "B"), grads((h * probe(h)).sum(), leaves),
                               grads((h_ref * probe(h_ref)).sum(), leaves)):
        assert_close(got, want, name=name)


def test_chunk_end_states_float64_gradcheck():
    inp = mamba1_inputs(2, 6, 3, 4, with_h0=False, dtype=torch.float64, seed=17)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"][:, :, 0].detach().requires_grad_())
    assert torch.autograd.gradcheck(_Mamba1EndStates.apply, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_selective_chunk_len():
    for length in (1, 2, 3, 7, 37, 64, 100, 512, 2048, 4096):
        for shape in ((1, 16, 4), (8, 512, 16), (1, 1536, 16)):
            k = selective_chunk_len(shape[0], length, shape[1], shape[2])
            assert k & (k - 1) == 0 and math.sqrt(length) <= k <= 16 * math.sqrt(length)
    assert selective_chunk_len(8, 512, 512, 16) == 64           # 2 MiB slices (b c, n, d)
    assert selective_chunk_len(1, 2048, 1536, 16) == 128        # 1.5 MiB
    assert selective_chunk_len(1, 512, 64, 16) == 32            # small state: k = 2^ceil(log2 sqrt(l))
