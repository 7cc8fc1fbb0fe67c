"""The kernel registry: every registered kernel against its pure-PyTorch reference twin, bit for
bit (parametrised over the registry's entries: a new kernel is paired as soon as it is
registered), every C build against every other, and the ways to choose one (forced(), the
environment). Builds this CPU lacks skip."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from qmamba.errors import QMambaError
from qmamba.kernels import cpu_features, cpu_native, registry
from qmamba.kernels import reference as ref
from qmamba.kernels.mamba2_layer import Mamba2Layer, Mamba2Layers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(g, *shape) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)


# ------------------------------------------------------------------ inputs per operation
def _i8_linear_cases():
    g = _gen(1)
    for m, n, k, gs in [(1, 7, 45, 0), (3, 16, 64, 0), (5, 9, 96, 32), (2, 13, 40, 8), (17, 4, 768, 128),
                        (2, 6, 200, 0), (1, 5, 130, 0)]:
        groups = k // gs if gs else 1
        bias = torch.randn(n, generator=g)
        for b in (None, bias):
            yield (_codes(g, m, k), torch.rand(m, generator=g), _codes(g, n, k), torch.rand(n, groups, generator=g),
                   gs, b)


def _i8_linear_quantizing_cases():
    g = _gen(2)
    for m, n, k, gs in [(1, 7, 45, 0), (3, 16, 64, 0), (5, 9, 96, 32), (17, 4, 768, 128), (2, 6, 200, 0)]:
        for static in (None, 0.03):
            yield (torch.randn(m, k, generator=g) * 3, static, _codes(g, n, k),
                   torch.rand(n, k // gs if gs else 1, generator=g), gs, torch.randn(n, generator=g))


def _f32i8_linear_cases():
    g = _gen(3)
    for m, n, k in [(1, 11, 37), (4, 8, 64), (70, 5, 24), (1, 768, 768), (3, 9, 203)]:
        yield torch.randn(m, k, generator=g), _codes(g, n, k), torch.rand(n, generator=g)


def _exp_f32_cases():
    yield (torch.linspace(-100.0, 95.0, 40_000),)            # full blocks of 8 only: no libm expf
    yield (torch.randn(4096, generator=_gen(4)) * 30,)


def _dsq_scan_cases():
    """(codes, scales, x, dt, A, B, C, s_n, static, dynamic, per_byte, qmax): vector and scalar
    rows, int8 / 4-bit / 2-bit codes, per-head and per-state A, groups, tiny and large states
    (fp16 subnormal and large dynamic scales)."""
    g = _gen(5)
    b, d, length = 2, 8, 5
    for n, per_byte, n_a, groups, dynamic, qmax, mag in [
            (16, 1, 1, 1, True, 7.0, 1.0), (16, 2, 16, 2, False, 7.0, 1.0), (12, 2, 1, 2, False, 7.0, 1.0),
            (32, 1, 32, 1, True, 3.0, 1.0), (10, 1, 10, 1, True, 127.0, 1.0), (16, 4, 1, 1, True, 1.0, 1.0),
            (7, 2, 1, 1, True, 7.0, 1.0), (16, 2, 16, 1, True, 7.0, 1e-6), (32, 1, 32, 2, True, 127.0, 1e-5),
            (64, 2, 64, 1, True, 7.0, 1e3)]:
        q0 = torch.randint(-int(qmax), int(qmax) + 1, (b, d, n), generator=g).to(torch.int8)
        scales = (torch.rand(b, d, 1, generator=g) * mag + 1e-7).half() if dynamic else torch.empty(0)
        yield (ref.pack_codes(q0, per_byte).contiguous(), scales, torch.randn(b, length, d, generator=g),
               torch.rand(b, length, d, generator=g), -4 * torch.rand(d, n_a, generator=g),
               torch.randn(b, length, groups, n, generator=g) * mag, torch.randn(b, length, groups, n, generator=g),
               torch.rand(n, generator=g) + 0.5, torch.rand(d, 1, generator=g) + 0.1, dynamic, per_byte, qmax)


def _mamba2_conv_step_cases():
    """(xbc, scale, state, weight, bias): conv widths 4 and 2, with and without bias, a row slice
    of a wider tensor, inputs beyond the 8-bit range (clamped)."""
    g = _gen(6)
    for b, cd, w, bias, wide in [(1, 24, 4, True, True), (3, 10, 4, False, False), (2, 9, 2, True, False)]:
        x = torch.randn(b, cd + (7 if wide else 0), generator=g) * 3
        state = torch.randint(-127, 128, (b, cd, w - 1), generator=g).to(torch.int8)
        yield (x[:, 3:3 + cd] if wide else x, 0.02, state, torch.randn(cd, 1, w, generator=g),
               torch.randn(cd, generator=g) if bias else None)


def _mamba2_ssm_step_cases():
    """(xbc, dt, z, act_scales, A, D, codes, scales, s_n, static, dynamic, per_byte, qmax, headdim,
    ngroups): DSQ dynamic 4-bit and static int8 states, one and two groups, vector and scalar rows."""
    g = _gen(7)
    for b, h, hd, n, groups, dynamic, per_byte, qmax in [(1, 4, 4, 16, 1, True, 2, 7.0), (3, 2, 8, 16, 2, True, 2, 7.0),
                                                         (2, 3, 2, 10, 1, False, 1, 127.0)]:
        d = h * hd
        q0 = torch.randint(-int(qmax), int(qmax) + 1, (b, d, n), generator=g).to(torch.int8)
        scales = (torch.rand(b, d, 1, generator=g) + 1e-3).half() if dynamic else torch.empty(0)
        z = torch.randn(b, d + 5, generator=g) * 2
        yield (torch.randn(b, d + 2 * groups * n, generator=g) * 2, torch.rand(b, h, generator=g), z[:, 5:],
               (0.015, 0.02, 0.025, 0.01, 0.03), -4 * torch.rand(d, 1, generator=g), torch.randn(d, generator=g),
               ref.pack_codes(q0, per_byte).contiguous(), scales, torch.rand(n, generator=g) + 0.5,
               torch.rand(d, 1, generator=g) + 0.1, dynamic, per_byte, qmax, hd, groups)


def _mamba2_layer(g, b, D, h, hd, n, groups, w, dynamic, per_byte, qmax, gs, in_dynamic, bias, dt_limit):
    """One block's arguments with random tensors of the given shapes (`Mamba2Layer`)."""
    d = h * hd
    cd, N = d + 2 * groups * n, 2 * d + 2 * groups * n + h
    q0 = torch.randint(-int(qmax), int(qmax) + 1, (b, d, n), generator=g).to(torch.int8)

    def weight(rows, cols):
        codes = _codes(g, rows, cols)
        size = gs or cols
        sums = codes.view(rows, cols // size, size).sum(-1, dtype=torch.int32)
        return codes, sums, torch.rand(rows, cols // size, generator=g) * 0.02, size

    in_w, in_sums, in_sw, in_gs = weight(N, D)
    out_w, out_sums, out_sw, out_gs = weight(D, d)
    return Mamba2Layer(
        D=D, d=d, n=n, g=groups, headdim=hd, w=w, norm_w=torch.rand(D, generator=g) + 0.5, norm_eps=1e-5,
        in_w=in_w, in_sums=in_sums, in_sw=in_sw, in_gs=in_gs, in_bias=torch.randn(N, generator=g) if bias else None,
        in_sx=0.03, in_dynamic=in_dynamic, dt_bias=torch.randn(h, generator=g), dt_lo=dt_limit[0], dt_hi=dt_limit[1],
        s_conv=0.02, sx=0.015, sB=0.02, sC=0.025, sdt=0.01, sz=0.03,
        conv_state=torch.randint(-127, 128, (b, cd, w - 1), generator=g).to(torch.int8),
        conv_w=torch.randn(cd, w, generator=g), conv_b=torch.randn(cd, generator=g) if bias else None,
        A=(-4 * torch.rand(h, generator=g)).repeat_interleave(hd)[:, None], Dskip=torch.randn(d, generator=g),
        codes=ref.pack_codes(q0, per_byte).contiguous(),
        scales=(torch.rand(b, d, 1, generator=g) + 1e-3).half() if dynamic else torch.empty(0),
        s_n=torch.rand(n, generator=g) + 0.5, s_c=torch.rand(d, 1, generator=g) + 0.1, dynamic=dynamic,
        per_byte=per_byte, qmax=qmax, gnorm_w=torch.rand(d, generator=g) + 0.5, group_size=d // groups,
        gnorm_eps=1e-5, out_w=out_w, out_sums=out_sums, out_sw=out_sw, out_gs=out_gs,
        out_bias=torch.randn(D, generator=g) if bias else None, out_sx=0.02, out_dynamic=in_dynamic)


def _mamba2_model_step_cases():
    """(layers, hidden): two or three blocks; DSQ dynamic 4-bit and static int8 states; one and
    two groups; per-channel and group-wise weights; static and dynamic activation scales; biases;
    a dt limit; vector (n = 16) and scalar (n = 10) state rows; batch 1 and 3."""
    g = _gen(8)
    for b, D, h, hd, n, groups, dynamic, per_byte, qmax, gs, in_dyn, bias, limit, nl in [
            (1, 48, 4, 8, 16, 1, True, 2, 7.0, 0, False, False, (0.0, float("inf")), 3),
            (3, 64, 2, 16, 16, 2, True, 2, 7.0, 16, True, True, (0.001, 0.1), 2),
            (2, 40, 3, 4, 10, 1, False, 1, 127.0, 0, False, True, (0.0, float("inf")), 2)]:
        layers = Mamba2Layers(_mamba2_layer(g, b, D, h, hd, n, groups, 4, dynamic, per_byte, qmax, gs, in_dyn, bias,
                                            limit) for _ in range(nl))
        yield layers, torch.randn(b, D, generator=g) * 2


CASES = {"i8_linear": _i8_linear_cases, "i8_linear_quantizing": _i8_linear_quantizing_cases,
         "f32i8_linear": _f32i8_linear_cases, "exp_f32": _exp_f32_cases, "dsq_scan": _dsq_scan_cases,
         "mamba2_conv_step": _mamba2_conv_step_cases, "mamba2_ssm_step": _mamba2_ssm_step_cases,
         "mamba2_model_step": _mamba2_model_step_cases}
IN_PLACE = {"dsq_scan": (0, 1), "mamba2_conv_step": (2,), "mamba2_ssm_step": (6, 7)}   # arguments written
SCALAR_EXP = ("dsq_scan", "mamba2_ssm_step", "mamba2_model_step")                       # twins taking expf
LAYER_STATE = ("conv_state", "codes", "scales")                     # what mamba2_model_step writes per layer


def _clone(args):
    out = []
    for a in args:
        if isinstance(a, Mamba2Layers):
            a = Mamba2Layers(dataclasses.replace(layer, **{f: getattr(layer, f).clone() for f in LAYER_STATE})
                             for layer in a)
        out.append(a.clone() if isinstance(a, torch.Tensor) else a)
    return out


def _scalar_exp(entry: registry.Entry):
    """The C library's expf, which PyTorch cannot reproduce: taken from the same build (exp_f32 of
    fewer than 8 values is expf)."""
    exp = next(e for e in registry.entries("exp_f32", entry.device) if e.impl == entry.impl).load()
    return lambda t: torch.stack([exp(v.reshape(1))[0] for v in t.reshape(-1)]).reshape(t.shape) if t.numel() \
        else t.clone()


def _run(entry: registry.Entry, fn, args):
    """What one call returns plus what it wrote in place (`IN_PLACE`)."""
    args = _clone(args)
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    written = [getattr(layer, f) for a in args if isinstance(a, Mamba2Layers) for layer in a for f in LAYER_STATE]
    return outs + [args[i] for i in IN_PLACE.get(entry.op, ())] + written


def _outputs(entry: registry.Entry):
    fn = entry.load()
    if fn is None:
        pytest.skip(f"{entry.impl} does not run here: {cpu_native.error(entry.impl)}")
    return [_run(entry, fn, args) for args in CASES[entry.op]() for _ in range(2)]   # twice: cached row sums


def test_every_operation_has_cases_and_a_twin():
    assert set(CASES) == set(registry.OPS) == {e.op for e in registry.entries()}
    for e in registry.entries():
        assert e.reference is getattr(ref, e.op)


@pytest.mark.parametrize("entry", registry.entries(), ids=lambda e: f"{e.op}-{e.device}-{e.impl}")
def test_kernel_equals_its_reference_twin(entry):
    """Bit for bit: outputs and what the kernel writes in place (dsq_scan's codes and scales, the
    Mamba2 step's conv state, codes and scales)."""
    fn = entry.load()
    if fn is None:
        pytest.skip(f"{entry.impl} does not run here: {cpu_native.error(entry.impl)}")
    for args in CASES[entry.op]():
        got = _run(entry, fn, args)
        twin = entry.reference
        if entry.op in SCALAR_EXP:
            twin = lambda *a: entry.reference(*a, scalar_exp=_scalar_exp(entry))   # noqa: E731
        want = _run(entry, twin, args)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), f"{entry.op} on {entry.impl}: {(a != b).sum().item()} values differ"


def test_exp_tail_is_the_c_library_expf():
    """The one seam of the twins: fewer than 8 values go through expf, which torch.exp matches to
    within one float32 ulp (not bit for bit: hence the twins' scalar_exp)."""
    k = registry.lookup("exp_f32", "cpu")
    if k is None:
        pytest.skip("no C kernels here")
    x = torch.linspace(-80.0, 80.0, 7)
    torch.testing.assert_close(k(x), torch.exp(x), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("op", registry.OPS)
def test_every_build_computes_the_same_bits(op):
    """All C builds this CPU runs (at least two for the test to mean something; skips otherwise)."""
    builds = [e for e in registry.entries(op, "cpu") if e.load() is not None]
    if len(builds) < 2:
        pytest.skip(f"fewer than two builds run here: {[e.impl for e in builds]}")
    first = _outputs(builds[0])
    for e in builds[1:]:
        for a, b in zip(_outputs(e), first):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), f"{op}: {e.impl} != {builds[0].impl}"


def test_fma_twin_rounds_once():
    """fma_f32 is one rounding of the exact a * b + c: a case where two roundings differ."""
    a = torch.tensor([1.0 + 2.0 ** -12])
    c = torch.tensor([-(1.0 + 2.0 ** -11)])
    assert ref.fma_f32(a, a, c).item() == 2.0 ** -24                     # exact: (1 + 2^-12)^2 - 1 - 2^-11
    assert (a * a + c).item() == 0.0                                     # the product rounds first


# ------------------------------------------------------------------------ choosing a kernel
def test_lookup_prefers_the_best_build_and_forced_lowers_it():
    runnable = cpu_features.runnable()
    best = registry.lookup("i8_linear", "cpu")
    if best is None:
        pytest.skip(f"no C kernels here: {cpu_native.unavailable_reason()}")
    assert best.impl == cpu_features.candidates()[0]
    for isa in runnable:
        with registry.forced(isa):
            assert registry.lookup("i8_linear", "cpu").impl == isa
    with registry.forced("torch"):
        assert all(registry.lookup(op, "cpu") is None for op in registry.OPS)
    with registry.forced("torch", ops=("dsq_scan",)):
        assert registry.lookup("dsq_scan", "cpu") is None
        assert registry.lookup("i8_linear", "cpu").impl == best.impl
    assert registry.lookup("i8_linear", "cpu") == best
    assert registry.lookup("i8_linear", "meta") is None                # no kernel for that device


def test_forced_refuses_unknown_names_and_missing_features():
    with pytest.raises(QMambaError, match="expected one of"):
        with registry.forced("sse9"):
            pass
    with pytest.raises(ValueError, match="unknown kernel operations"):
        with registry.forced("torch", ops=("matmul",)):
            pass
    lacking = [isa for isa in cpu_features.ISAS if isa not in cpu_features.runnable()]
    for isa in lacking:
        with pytest.raises(QMambaError, match="not available here"):
            with registry.forced(isa):
                pass


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os
    environ = {k: v for k, v in os.environ.items() if k not in ("QMAMBA_CPU_ISA", "QMAMBA_NO_CPU_KERNELS")}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_environment_forces_a_lower_build():
    if cpu_native.native("portable") is None:
        pytest.skip(f"no portable build here: {cpu_native.error('portable')}")
    r = _python("from qmamba.kernels import lookup; k = lookup('i8_linear', 'cpu'); print(k and k.impl)",
                QMAMBA_CPU_ISA="portable")
    assert r.returncode == 0 and r.stdout.strip() == "portable", r.stderr[-2000:]


def test_environment_refuses_a_build_the_cpu_lacks_in_one_line():
    lacking = [isa for isa in cpu_features.ISAS if isa not in cpu_features.runnable()]
    for isa, expect in [("sse9", "expected one of"), *((isa, "not available here") for isa in lacking[:1])]:
        r = _python("import qmamba.kernels as k\ntry:\n    k.lookup('i8_linear', 'cpu')\n"
                    "except Exception as e:\n    print(type(e).__name__, e)", QMAMBA_CPU_ISA=isa)
        assert r.returncode == 0, r.stderr[-2000:]
        line = r.stdout.strip()
        assert line.startswith("QMambaError") and expect in line and "\n" not in line, line


def test_kernels_package_imports_nothing_above_it():
    """Loaded on its own (the package root, which imports everything, replaced by a bare one)."""
    from pathlib import Path

    import qmamba
    root = Path(qmamba.__file__).parent
    r = _python("import sys, types\n"
                f"pkg = types.ModuleType('qmamba'); pkg.__path__ = [{str(root)!r}]; sys.modules['qmamba'] = pkg\n"
                "import qmamba.kernels.registry\n"
                "print(sorted(m for m in sys.modules if m.startswith('qmamba.') and "
                "m.split('.')[1] in ('quant', 'methods', 'eval', 'cli')))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_a_command_refuses_a_bad_isa_before_any_work():
    """The CLI checks QMAMBA_CPU_ISA first: exit 2 and one line, not an error minutes later."""
    r = _python("import sys\nfrom qmamba.cli import main\nsys.exit(main(['memory', 'ref-mamba2']))",
                QMAMBA_CPU_ISA="sse9")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0] == "qmamba memory: error: QMAMBA_CPU_ISA=sse9: expected one of portable, avx2, avxvnni, avx512vnni"
