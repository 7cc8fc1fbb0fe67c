"""The C kernels against exact references, on every build this CPU runs (portable, avx2,
avxvnni, avx512vnni; the others skip): int8 x int8 products are integers below 2**24 here, so
float32 holds them exactly and the kernel must match to the last bit; odd shapes hit the tails
(rows not a multiple of 4, columns not a multiple of 32 or 64)."""

from __future__ import annotations

import pytest
import torch

from qmamba.kernels import cpu_native, forced, registry
from qmamba.quant.intmm import blockwise_linear
from qmamba.quant.primitives import dequantize_weight


def codes(*shape, seed=0):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, n, k, gs", [(1, 7, 45, 0), (3, 16, 64, 0), (5, 9, 96, 32), (2, 13, 40, 8),
                                         (17, 4, 768, 128), (1, 1, 1, 0)])
def test_i8_linear_is_exact(m, n, k, gs, native_build):
    q_x, w = codes(m, k, seed=1), codes(n, k, seed=2)
    groups = k // gs if gs else 1
    ones = torch.ones(n, groups)
    exact = (q_x.long() @ w.long().t()).float()
    for _ in range(3):                  # VNNI row sums: summed in the kernel, then cached, reused
        assert torch.equal(native_build.i8_linear(q_x, torch.ones(m), w, ones, gs, None), exact)


def test_i8_linear_applies_scales_and_bias(native_build):
    g = torch.Generator().manual_seed(4)
    m, n, k, gs = 3, 10, 96, 32
    q_x, w = codes(m, k, seed=5), codes(n, k, seed=6)
    s_x, s_w, bias = torch.rand(m, generator=g), torch.rand(n, k // gs, 1, generator=g), torch.randn(n, generator=g)
    out = native_build.i8_linear(q_x, s_x, w, s_w, gs, bias)
    ref = (q_x.double() * s_x[:, None].double()) @ dequantize_weight(w, s_w, gs, torch.float64).t() + bias.double()
    terms = (q_x.double().abs() * s_x[:, None].double()) @ dequantize_weight(w, s_w, gs, torch.float64).abs().t()
    assert ((out.double() - ref).abs() <= 1e-6 * (terms + bias.double().abs())).all()    # per summed term


@pytest.mark.parametrize("m, n, k", [(1, 11, 37), (4, 8, 64), (70, 5, 24)])
def test_f32i8_linear_matches_float(m, n, k, native_build):
    g = torch.Generator().manual_seed(7)
    x, w, s = torch.randn(m, k, generator=g), codes(n, k, seed=8), torch.rand(n, generator=g)
    out = native_build.f32i8_linear(x, w, s)
    ref = x.double() @ (w.double() * s[:, None].double()).t()
    terms = x.double().abs() @ (w.double() * s[:, None].double()).abs().t()
    assert ((out.double() - ref).abs() <= 1e-6 * terms).all()        # float32 sums of k terms, per term


def test_blockwise_linear_matches_whole_dequantization():
    g = torch.Generator().manual_seed(9)
    x, w, s = torch.randn(3, 16, generator=g), codes(50, 16, seed=10), torch.rand(50, 1, generator=g)
    whole = x @ dequantize_weight(w, s, 0).t()
    terms = x.abs() @ dequantize_weight(w, s, 0).abs().t()
    assert ((blockwise_linear(x, w, s, block=8) - whole).abs() <= 1e-6 * terms).all()


def test_vectorised_exp_is_within_two_tenths_of_a_millionth(native_build):
    """The state kernel's exp (per-state decays exp(dt A) <= 1 of Mamba1) against float64 exp on
    a dense grid of [-87, 5]: relative error under 2e-7 (about one float32 ulp), and the
    clamp below -87.34 gives about 2^-126 (the smallest normal float), not 0 or garbage."""
    x = torch.linspace(-87.0, 5.0, 2_000_003)
    rel = ((native_build.exp_f32(x).double() - x.double().exp()) / x.double().exp()).abs()
    assert rel.max().item() < 2e-7, rel.max().item()
    tiny = native_build.exp_f32(torch.full((16,), -200.0))
    torch.testing.assert_close(tiny, torch.full((16,), 2.0 ** -126), rtol=1e-5, atol=0)


def test_disabled_by_environment(monkeypatch):
    registry.reset()
    monkeypatch.setenv("QMAMBA_NO_CPU_KERNELS", "1")
    try:
        assert not cpu_native.available()
        assert "QMAMBA_NO_CPU_KERNELS" in cpu_native.unavailable_reason()
        assert all(registry.lookup(op, "cpu") is None for op in registry.OPS)
    finally:
        monkeypatch.undo()
        registry.reset()


_exp = torch.exp


def kernel_exp(t, *args, exp_f32, **kwargs):
    """exp(dt A) as dsq_scan computes it, row by row over the last dim (nA): `exp8` for each
    full block of 8 (exp_f32 of whole blocks), expf for the rest (exp_f32 of fewer than 8)."""
    if args or kwargs or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() == 0:
        return _exp(t, *args, **kwargs)
    n = t.shape[-1]
    full = n // 8 * 8
    rows = t.reshape(-1, n)
    out = torch.empty_like(rows)
    if full:
        out[:, :full] = exp_f32(rows[:, :full].contiguous())
    for r in range(rows.shape[0]) if full < n else ():
        out[r, full:] = exp_f32(rows[r, full:].contiguous())
    return out.reshape(t.shape)


@pytest.mark.parametrize("kind, n, bits, mode, nA, g", [
    ("dsq", 16, 4, "dynamic", 1, 1), ("dsq", 16, 8, "static", 16, 2), ("dsq", 12, 4, "static", 1, 2),
    ("dsq", 32, 3, "dynamic", 32, 1), ("dsq", 10, 8, "dynamic", 10, 1), ("channel", 16, 4, "dynamic", 1, 1),
    ("channel", 16, 4, "static", 1, 1), ("tensor", 16, 4, "static", 16, 1), ("state", 32, 4, "static", 1, 2),
    ("head", 16, 2, "static", 1, 1), ("dsq", 10, 2, "dynamic", 10, 1), ("channel", 7, 4, "dynamic", 1, 1)])
def test_dsq_scan_matches_the_eager_cache(kind, n, bits, mode, nA, g, native_build, monkeypatch):
    """The C recurrence over l tokens on the integer cache (vector and scalar lanes, packed and
    int8 codes, per-head and per-state A, every quantizer it covers) against the eager read ->
    update -> write, token by token: codes and scales bit for bit. Exact by construction on any
    CPU, not by luck: the kernel rounds every product like eager (no FMA), and the reference
    takes exp(dt A) from the kernel's own exp (`kernel_exp`), the one approximation that
    PyTorch's vectorised exp (AVX2, AVX-512 or scalar) computes differently in the last bit.
    On every build: forced(isa) makes the registry's dsq_scan that build's."""
    import functools

    from qmamba.quant import qscan
    from qmamba.quant.state import StateQuantizer

    gen = torch.Generator().manual_seed(11)
    b, d, length = 2, 8, 5
    q = StateQuantizer(kind, bits, d, n, headdim=4, scale_mode=mode)
    with forced(native_build.isa):
        assert qscan.use_cpu_kernel(q, torch.zeros(1))
        assert registry.lookup("dsq_scan", "cpu").impl == native_build.isa
    q.mode = "observe"
    q.observe(torch.randn(4, d, n, generator=gen) * 3)
    q.finish_calibration()
    A = -4 * torch.rand(d, nA, generator=gen)
    x, dt = torch.randn(b, length, d, generator=gen), torch.rand(b, length, d, generator=gen)
    B, C = torch.randn(b, length, g, n, generator=gen), torch.randn(b, length, g, n, generator=gen)
    fast, ref = q.allocate(b), q.allocate(b)
    with forced(native_build.isa):
        y = qscan.kernel_scan(fast, x, dt, A, B, C)
    monkeypatch.setattr(qscan, "compile_enabled", lambda: False)     # the eager step, whatever the environment
    monkeypatch.setattr(qscan, "_COMPILED", {})
    monkeypatch.setattr(torch, "exp", functools.partial(kernel_exp, exp_f32=native_build.exp_f32))
    with forced("torch"):
        y_ref = torch.stack([ref.step(x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(length)], dim=1)
    monkeypatch.undo()
    assert fast.codes.dtype == ref.codes.dtype and fast.codes.shape == ref.codes.shape
    assert torch.equal(fast.codes, ref.codes)
    assert torch.equal(fast.scales, ref.scales)
    # y = <h, C>: the same products summed in another order (float32, n <= 32 terms)
    assert ((y - y_ref).abs().max() / y_ref.abs().max()).item() < 1e-5


def test_kernel_model_matches_eager_model(monkeypatch):
    """A whole W8A8H4 DSQ model: prompt path and decode steps with the C kernels and without."""
    from qmamba.quantize import quantize

    from .test_checkpoint import CALIB, IDS, float_model

    model = quantize(float_model("mamba2"), "w8a8h4", calib=CALIB, method="dsq", progress=False)

    def run():
        with torch.no_grad():
            cache = model.allocate_cache(IDS.shape[0])
            head = model(IDS[:, :4], cache)
            steps = [model.step(IDS[:, t], cache) for t in range(4, IDS.shape[1])]
            return torch.cat([head, torch.stack(steps, 1)], 1), model(IDS)

    if not cpu_native.available():
        pytest.skip(f"no C kernels here: {cpu_native.unavailable_reason()}")
    fast = run()
    with forced("torch"):
        slow = run()
    for a, b in zip(fast, slow):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
