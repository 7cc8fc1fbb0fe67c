"""The bad paths of the C kernels: a cached library that is garbage, lacks a symbol or computes
wrong numbers (verified after loading, rebuilt, or the PyTorch path after one warning line), no
compiler, the kernels switched off; weight codes the kernel cannot multiply (-128: refused at
load), group sizes that do not tile the inner size (refused), inner sizes whose int32 sums would
overflow (exact), and gcc's fused multiply-adds (the state update must round like eager).

Every test here runs on any machine: what needs a C compiler or a build this CPU lacks skips
without it, and every test that builds uses its own cache folder ($QMAMBA_CACHE)."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import qmamba
from qmamba.errors import QMambaError
from qmamba.kernels import cpu_build, cpu_features, cpu_native, registry
from qmamba.quant import intmm
from qmamba.quant.activation import ActQuantizer
from qmamba.quant.checkpoint import save_quantized
from qmamba.quant.intmm import linear_int
from qmamba.quant.linear import QLinear
from qmamba.quant.primitives import pack

from .test_checkpoint import quantized

CC = shutil.which("gcc") or shutil.which("cc")
needs_kernel = pytest.mark.skipif(not CC, reason="needs a C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernels as in a new process: nothing loaded yet, an empty cache folder of its own, the
    kernels not switched off; returns where the library of the best build is cached."""
    monkeypatch.setenv("QMAMBA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QMAMBA_NO_CPU_KERNELS", raising=False)
    monkeypatch.delenv("CC", raising=False)
    registry.reset()
    yield cpu_build.cache_path()
    monkeypatch.undo()
    registry.reset()


@pytest.fixture
def kernel():
    """The process's kernel (built into $QMAMBA_CACHE); skips where there is none."""
    if not cpu_native.available():
        pytest.skip(f"no C kernel here: {cpu_native.unavailable_reason()}")


def _compile(dest, *defines):
    """The real source of the best build, compiled with the project's flags plus `defines`, at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cpu_build.build_command(CC, cpu_features.candidates()[0], dest, defines), check=True)


def _damage(kind: str, path):
    if kind == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF this is not a shared library" * 10)
    elif kind == "missing-symbol":           # a valid library without dsq_scan
        _compile(path, "-Ddsq_scan=dsq_scan_renamed")
    else:                                    # valid, every symbol, wrong numbers: i8_linear_f32 rounds down
        _compile(path, "-Dnearbyintf=floorf")


def _linear_and_input():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
    x = torch.randn(3, 64, generator=g) * 2
    aq = ActQuantizer(8, dynamic=True)
    aq.mode = "observe"
    aq(x)
    aq.finish_calibration()
    return QLinear.from_linear(lin, 8, input_quant=aq), x


def _integer_result_is_right():
    """An integer linear (C kernel or torch._int_mm, whichever is on) agrees with the simulated one."""
    q, x = _linear_and_input()
    with torch.no_grad():
        sim, ints = q(x), linear_int(q, x)
    return ((ints - sim).abs().max() / sim.abs().max()).item() < 1e-5


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "qmamba"]


# --------------------------------------------------------------------------- the cached library
@needs_kernel
@pytest.mark.parametrize("kind", ["garbage", "missing-symbol", "wrong-numbers"])
def test_bad_cached_library_is_rebuilt(fresh, kind, caplog):
    _damage(kind, fresh)
    with caplog.at_level(logging.WARNING, logger="qmamba"):
        assert cpu_native.available(), cpu_native.unavailable_reason()
        warned = _warnings(caplog)
    assert len(warned) == 1 and "rebuilt" in warned[0] and "\n" not in warned[0], warned
    assert _integer_result_is_right()
    copy = fresh.parent.parent / "copy.so"                   # (dlopen of a loaded name: the old library)
    shutil.copy(fresh, copy)
    cpu_native._self_test(cpu_native._bind(copy), cpu_features.candidates()[0])    # a good one now
    copy.unlink()
    assert [p.name for p in fresh.parent.iterdir()] == [fresh.name]    # no temporary file left


@pytest.mark.parametrize("kind", ["none", "garbage", "missing-symbol", "wrong-numbers"])
def test_no_compiler_falls_back_with_one_warning(fresh, kind, caplog, monkeypatch):
    if kind in ("missing-symbol", "wrong-numbers") and not CC:
        pytest.skip("needs a C compiler to make the damaged library")
    if kind != "none":
        _damage(kind, fresh)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="qmamba"):
        assert not cpu_native.available()
        assert not cpu_native.available()
        assert _integer_result_is_right()                        # torch._int_mm
    warned = _warnings(caplog)
    assert len(warned) == 1 and "\n" not in warned[0] and "PyTorch path" in warned[0], warned
    assert "/nonexistent/cc" in warned[0]


def test_switched_off_without_warning(fresh, caplog, monkeypatch):
    monkeypatch.setenv("QMAMBA_NO_CPU_KERNELS", "1")
    with caplog.at_level(logging.WARNING, logger="qmamba"):
        assert not cpu_native.available()
        assert _integer_result_is_right()
    assert "QMAMBA_NO_CPU_KERNELS" in cpu_native.unavailable_reason()
    assert _warnings(caplog) == [] and not fresh.exists()


def test_cache_name_follows_source_flags_and_build(fresh, monkeypatch):
    name = cpu_build.cache_path().name
    names = {cpu_build.cache_path(isa).name for isa in cpu_features.ISAS}
    assert len(names) == len(cpu_features.ISAS) and name in names
    monkeypatch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DQMAMBA_TEST"])
    assert cpu_build.cache_path().name != name
    assert all("-ffp-contract=off" in cpu_build.flags(isa) for isa in cpu_features.ISAS)


SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from qmamba.quant.intmm import linear_int
    from qmamba.quant.linear import QLinear
    q = QLinear.from_linear(nn.Linear(64, 8), 8)
    x = torch.randn(2, 64)
    assert ((linear_int(q, x) - q(x)).abs().max() / q(x).abs().max()).item() < 1e-5
    print("ok")
""")


@pytest.mark.parametrize("env", ["garbage+no-compiler", "switched-off"])
def test_a_command_survives_with_at_most_one_line(env, tmp_path):
    """In a fresh process: a garbage cached library and no compiler, or the kernels switched off,
    end on the PyTorch path with at most one line on stderr (no traceback)."""
    cache = tmp_path / "cache"
    environ = {**os.environ, "QMAMBA_CACHE": str(cache)}
    environ.pop("QMAMBA_NO_CPU_KERNELS", None)
    if env == "switched-off":
        environ["QMAMBA_NO_CPU_KERNELS"] = "1"
        expected = 0
    else:
        environ["CC"] = "/nonexistent/cc"
        _damage("garbage", cache / "kernels" / cpu_build.cache_path().name)
        expected = 1
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=environ, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == expected, lines
    assert all(ln.startswith("qmamba: C kernels unavailable") for ln in lines), lines


@needs_kernel
def test_two_processes_building_at_once(tmp_path):
    """Two fresh processes build into the same empty cache at the same time: both get a verified
    library, quietly, and the cache ends with one whole file and no temporary ones."""
    environ = {**os.environ, "QMAMBA_CACHE": str(tmp_path / "cache")}
    environ.pop("QMAMBA_NO_CPU_KERNELS", None)
    environ.pop("CC", None)
    script = "from qmamba.kernels import cpu_native as c; assert c.available(), c.unavailable_reason(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok" and not err.strip(), err[-2000:]
    assert [f.name for f in (tmp_path / "cache" / "kernels").iterdir()] == [cpu_build.cache_path().name]


# ------------------------------------------------------------------------------- weight codes
@pytest.mark.parametrize("arch, config, module, tensor, code", [
    ("mamba2", "w8a8h4-head", "backbone.layers.1.mixer.in_proj", "qweight", -128),   # vpsignb cannot negate it
    ("mamba2", "w8a8h4-head", "backbone.embeddings", "codes", -128),                  # 8-bit embedding + tied head
    ("mamba1", "w4a16", "backbone.layers.0.mixer.out_proj", "qweight", -8),           # 4 bits: [-7, 7]
])
def test_codes_outside_the_symmetric_range_are_refused_at_load(tmp_path, arch, config, module, tensor, code):
    """A checkpoint holding a code that qmamba never writes (crafted here by damaging a model
    before saving, whatever the file format) is refused at load with one line naming it."""
    model = quantized(arch, config, "rtn")
    m = model.get_submodule(module)
    with torch.no_grad():
        if tensor == "qweight":
            q = m.codes()
            q[0, 5] = code
            m.qweight.copy_(pack(q, m.w_bits))
        else:
            m.codes[0, 5] = code
    out = save_quantized(model, tmp_path / "bad")
    with pytest.raises(QMambaError) as e:
        qmamba.load(out)
    msg = str(e.value)
    assert f"{module}.{tensor}" in msg and str(code) in msg and "\n" not in msg, msg


def test_valid_codes_load():
    q = QLinear.from_linear(nn.Linear(7, 3), 4)
    assert q.codes().abs().max() <= 7
    QLinear(7, 3, True, 4).load_state_dict(q.state_dict())                      # odd size: padding nibble


def test_minus_128_is_what_the_avx2_build_gets_wrong(native_build):
    """Why -128 is refused: the AVX2 product (|x| * sign(x)w) cannot negate it, so that build
    disagrees with the others (which get it right: the VNNI builds add 128 to the activations
    and subtract 128 * sum(w), the portable one multiplies plainly)."""
    q_x = torch.full((1, 64), -1, dtype=torch.int8)
    w = torch.full((4, 64), -128, dtype=torch.int8)
    out = native_build.i8_linear(q_x, torch.ones(1), w, torch.ones(4, 1), 0, None)
    assert torch.equal(out, (q_x.long() @ w.long().t()).float()) == (native_build.isa != "avx2")


# ---------------------------------------------------------------------------------- group sizes
def test_group_size_must_tile_the_inner_size():
    with pytest.raises(ValueError, match="does not divide"):
        QLinear(100, 8, True, 8, group_size=32)
    # quantizing such a layer keeps per-channel scales (correct, every column counted)
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(100, 8)
    q = QLinear.from_linear(lin, 8, group_size=32)
    assert q.group_size == 0
    x = torch.randn(2, 100, generator=g)
    with torch.no_grad():
        assert ((linear_int(q, x) - q(x)).abs().max() / q(x).abs().max()).item() < 1e-5


def test_kernel_refuses_a_group_size_that_drops_columns(kernel):
    q_x, w = torch.ones(1, 40, dtype=torch.int8), torch.ones(4, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match="multiple of the group size"):
        cpu_native.select().i8_linear(q_x, torch.ones(1), w, torch.ones(4, 1), 32, None)


# ----------------------------------------------------------------------------- int32 overflow
K_BIG = 140_001          # 127 * 127 * K > 2**31: one int32 sum would wrap


def _big_operands():
    g = torch.Generator().manual_seed(3)
    x = torch.full((2, K_BIG), 127, dtype=torch.int8)
    x[1] = torch.randint(-127, 128, (K_BIG,), generator=g, dtype=torch.int8)
    w = torch.full((5, K_BIG), 127, dtype=torch.int8)          # a block of four rows + a tail row
    w[2] = -127
    w[4] = torch.randint(-127, 128, (K_BIG,), generator=g, dtype=torch.int8)
    return x, w, x.long() @ w.long().t()


@pytest.mark.parametrize("k", [K_BIG, K_BIG - 1])              # a 32-column tail / none (140000 = 4375 * 32)
def test_kernel_sums_are_exact_beyond_int32(native_build, k):
    x, w, _ = _big_operands()
    x, w = x[:, :k].contiguous(), w[:, :k].contiguous()
    exact = x.long() @ w.long().t()
    assert exact.abs().max() > 2 ** 31
    for _ in range(3):                  # VNNI row sums: summed in the kernel, then cached, reused
        assert torch.equal(native_build.i8_linear(x, torch.ones(2), w, torch.ones(5, 1), 0, None), exact.float())


def test_torch_integer_sums_are_exact_beyond_int32():
    x, w, exact = _big_operands()
    assert torch.equal(intmm.int_mm(x, w.t()).long(), exact)


# --------------------------------------------------------------------- no fused multiply-add
def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _fma_sensitive_inputs(exp_f32):
    """(dA, q, x, B, eager code): the state update h = dA * q + x * B (dt = 1, scales 1) where
    the eager rounding (each product rounded, then the sum) lands exactly on a .5 boundary b, but
    both products have residuals of the same sign, so a fused multiply-add of either product
    moves h off b and rounds to the other neighbour. dA is the kernel's exp(A) (expf: one value
    per call to exp_f32)."""
    for i in range(1, 400):
        a = _f32(-0.0037 * i)
        dA = exp_f32(torch.tensor([a])).item()
        for q in range(20, 127):
            p = dA * q                                           # exact in float64
            big_p = _f32(p)
            delta = p - big_p
            if abs(delta) <= 2.0 ** -23:
                continue
            b = 0.5 if delta > 0 else 1.5
            t = b - big_p                                        # exact: a multiple of ulp(P)
            if _f32(t) != t:
                continue
            for j in range(1, 2000):
                x = _f32(1.0 + j * 2.0 ** -12)
                bb = _f32(t / x)
                eps = x * bb - t
                if _f32(x * bb) == t and eps * delta > 0 and abs(eps) > 2.0 ** -23:
                    return a, q, x, bb, (0 if b == 0.5 else 2)
    raise AssertionError("no FMA-sensitive input found")


@pytest.mark.parametrize("n", [16, 5])                         # vector lanes / scalar
def test_state_update_rounds_like_eager_without_fma(native_build, n):
    """The kernel claims eager rounding (-ffp-contract=off): on inputs where one fused
    multiply-add changes the code, its code is eager's, and so is torch's eager result."""
    a, q, x, bb, code = _fma_sensitive_inputs(native_build.exp_f32)
    b, d, length = 1, 2, 1
    codes = torch.full((b, d, n), q, dtype=torch.int8)
    ones = torch.ones(b, length, d)
    B = torch.full((b, length, 1, n), bb)
    y = native_build.dsq_scan(codes, torch.empty(0), torch.full((b, length, d), x), ones, torch.full((d, 1), a),
                       B, torch.ones(b, length, 1, n), torch.ones(n), torch.ones(d, 1), False, 1, 127.0)
    dA = native_build.exp_f32(torch.tensor([a]))
    h = dA * torch.tensor([float(q)]) + (torch.tensor([1.0]) * torch.tensor([x])) * torch.tensor([bb])
    assert torch.round(h).item() == code                         # eager torch: the boundary, half to even
    assert torch.equal(codes, torch.full_like(codes, code))
    assert torch.equal(y, torch.full_like(y, float(code * n)))
