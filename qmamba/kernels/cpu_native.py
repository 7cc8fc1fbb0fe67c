"""The C kernels of `cpu/int8_cpu.c` (integer GEMMs of the quantized linears, the DSQ step of
the integer state cache, Mamba2's fused decode pieces), called through ctypes.

PyTorch's own int8 CPU kernels (`torch._int_mm`, `_weight_int8pack_mm`) are built for CPUs with
VNNI/AMX; on a plain AVX2 CPU they are slower than the float GEMV they should replace (measured:
benchmarks/README.md). Each build (avx512vnni, avxvnni, avx2, portable) is compiled and cached by
`qmamba.kernels.cpu_build`; only the build that `cpu_features.candidates()` puts first is
compiled, and if it cannot be, the next lower one is, quietly. A library is used only after every
entry point exists and passes a small self-test against the PyTorch computation it replaces
(`_self_test`); if no build works, callers fall back to PyTorch's ops after one warning line on
the "qmamba" logger. `QMAMBA_NO_CPU_KERNELS=1` turns the kernels off without a warning.

`native(isa)` returns the loaded kernels of one build (`NativeKernels`, or None), `select()`
the best build allowed (see qmamba.kernels.registry for forcing one).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_build, cpu_features
from .mamba2_layer import CLayer, Mamba2Layers
from .reference import pack_codes, unpack_codes

SYMBOLS = ("i8_linear", "i8_linear_f32", "i8_row_sums", "f32i8_linear", "exp_f32", "dsq_scan", "mamba2_conv_step",
           "mamba2_ssm_step", "mamba2_model_step", "qmamba_isa")
VNNI = ("avxvnni", "avx512vnni")        # builds that subtract 128 * sum(w): they take row sums
DISABLE_ENV = "QMAMBA_NO_CPU_KERNELS"

log = logging.getLogger("qmamba")
_native: dict[str, "NativeKernels"] = {}    # isa -> loaded and verified
_errors: dict[str, str] = {}                # isa -> why it is not
_chosen: dict[Optional[str], Optional[str]] = {}   # forced ceiling -> the build in use (None: PyTorch)
_error: Optional[str] = None                # why no build is in use (the last selection)
_lock = threading.Lock()                    # one build and self-test at a time


def _bind(path: Path) -> ctypes.CDLL:
    """Load a compiled library and declare its entry points (AttributeError if one is missing)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32]
    lib.f32i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.i8_linear_f32.argtypes = [i64, i64, i64, ptr, ctypes.c_float, i32, ptr, ptr, ptr, i64, ptr, ptr, ptr, i32]
    lib.i8_row_sums.argtypes = [i64, i64, ptr, i64, ptr]
    lib.dsq_scan.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                             i32, i32, ctypes.c_float, ptr, i32]
    lib.exp_f32.argtypes = [i64, ptr, ptr]
    f32 = ctypes.c_float
    lib.mamba2_conv_step.argtypes = [i64, i64, i64, ptr, i64, f32, ptr, ptr, ptr, ptr, i32]
    lib.mamba2_ssm_step.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, f32, f32, f32, f32, f32, ptr, ptr,
                                    ptr, ptr, ptr, ptr, i32, i32, f32, ptr, ptr, ptr, i32]
    lib.mamba2_model_step.argtypes = [i64, ptr, i64, ptr, ptr, i32]
    for name in SYMBOLS:
        getattr(lib, name).restype = None
    lib.qmamba_isa.restype = ctypes.c_char_p
    lib.qmamba_isa.argtypes = []
    lib.qm_mamba2_layer_size.restype = i64
    lib.qm_mamba2_layer_size.argtypes = []
    lib.mamba2_model_step_scratch.restype = i64
    lib.mamba2_model_step_scratch.argtypes = [i64, ptr, i64]
    if lib.qm_mamba2_layer_size() != ctypes.sizeof(CLayer):
        raise RuntimeError(f"the C struct qm_mamba2_layer has {lib.qm_mamba2_layer_size()} bytes, its ctypes "
                           f"mirror {ctypes.sizeof(CLayer)}")
    return lib


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _f32c(t: Tensor) -> Tensor:
    """t as contiguous float32 (itself when it is: no dispatch on the per-token paths)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


class NativeKernels:
    """The entry points of one loaded build, with PyTorch-facing signatures. `threads` None: as
    many as torch uses; the self-test uses 1 (a parallel region can cost milliseconds on a busy
    machine)."""

    def __init__(self, lib: ctypes.CDLL, isa: str, threads: Optional[int] = None):
        self.lib, self.isa, self.threads = lib, isa, threads
        self._sums = WeakIdKeyDictionary()      # weight tensor -> (its layout, row sums)

    def _n_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def row_sums(self, codes: Tensor, group_size: int) -> Optional[Tensor]:
        """(N, G) int32 sums of each row's codes per group, which the VNNI builds subtract (times
        128); None for the other builds. Computed once per weight: cached under the tensor that
        holds the codes (a view's base), checked against its layout and version counter. A
        weight seen for the first time gets None (the kernel sums its rows itself): fresh codes
        of every call (W4 unpacked per call) never pay for a separate pass."""
        if self.isa not in VNNI:
            return None
        owner = codes if codes._base is None else codes._base
        layout = (codes.data_ptr(), tuple(codes.shape), codes.stride(), codes._version, group_size)
        hit = self._sums.get(owner)
        if hit is not None and hit[0] == layout:
            if hit[1] is None:                  # the second call: worth caching
                n, k = codes.shape
                sums = torch.empty(n, k // group_size, dtype=torch.int32)
                self.lib.i8_row_sums(n, k, _ptr(codes), group_size, _ptr(sums))
                self._sums[owner] = (layout, sums)
                return sums
            return hit[1]
        self._sums[owner] = (layout, None)
        return None

    def _int8_weights(self, m: int, k: int, codes: Tensor, w_scale: Tensor, group_size: int,
                      bias: Optional[Tensor]):
        """The weight-side arguments of the int8 GEMMs in the kernel's layout, and the (M, N) output."""
        n = codes.shape[0]
        gs = group_size or k
        if k % gs or codes.shape[1] != k:
            raise ValueError(f"int8 product: the inner size {k} must match the weight's ({codes.shape[1]}) "
                             f"and be a multiple of the group size {gs}")
        bias = None if bias is None else bias.float().contiguous()
        codes = codes.contiguous()
        return (codes, self.row_sums(codes, gs), w_scale.float().reshape(n, k // gs).contiguous(), gs, bias,
                torch.empty(m, n, dtype=torch.float32))

    def i8_linear(self, q_x: Tensor, s_x: Tensor, codes: Tensor, w_scale: Tensor, group_size: int,
                  bias: Optional[Tensor]) -> Tensor:
        """(M, K) int8 activations with (M,) float32 scales x (N, K) int8 weights with (N, G) float32
        scales (G = K / `group_size` groups of columns; G = 1 per channel) -> (M, N) float32. Weight
        codes must be in [-127, 127] (the AVX2 build cannot negate -128; loading refuses it); the
        integer sums are exact for any K (int64 across chunks of 65536 columns)."""
        m, k = q_x.shape
        codes, sums, w_scale, gs, bias, out = self._int8_weights(m, k, codes, w_scale, group_size, bias)
        q_x, s_x = q_x.contiguous(), s_x.float().expand(m).contiguous()
        self.lib.i8_linear(m, out.shape[1], k, _ptr(q_x), _ptr(s_x), _ptr(codes), _ptr(sums), _ptr(w_scale), gs,
                           _ptr(bias), _ptr(out), self._n_threads())
        return out

    def i8_linear_quantizing(self, x: Tensor, static_scale: Optional[float], codes: Tensor, w_scale: Tensor,
                             group_size: int, bias: Optional[Tensor]) -> Tensor:
        """`i8_linear` of float activations (M, K) that the kernel quantizes to int8 itself: with
        the per-tensor `static_scale`, or per row (dynamic) when it is None."""
        m, k = x.shape
        codes, sums, w_scale, gs, bias, out = self._int8_weights(m, k, codes, w_scale, group_size, bias)
        x, s_x = x.float().contiguous(), torch.empty(m, dtype=torch.float32)
        self.lib.i8_linear_f32(m, out.shape[1], k, _ptr(x), 0.0 if static_scale is None else float(static_scale),
                               int(static_scale is None), _ptr(codes), _ptr(sums), _ptr(w_scale), gs, _ptr(bias),
                               _ptr(out), _ptr(s_x), self._n_threads())
        return out

    def f32i8_linear(self, x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
        """(M, K) float32 x (N, K) int8 weights with (N,) float32 row scales -> (M, N) float32."""
        m, k = x.shape
        n = codes.shape[0]
        x, codes = x.float().contiguous(), codes.contiguous()
        scale = scale.float().reshape(n).contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        self.lib.f32i8_linear(m, n, k, _ptr(x), _ptr(codes), _ptr(scale), _ptr(out), self._n_threads())
        return out

    def exp_f32(self, x: Tensor) -> Tensor:
        """exp of float32 values with the kernel's vectorised exp (the per-state decays of dsq_scan)."""
        x = x.float().contiguous()
        y = torch.empty_like(x)
        self.lib.exp_f32(x.numel(), _ptr(x), _ptr(y))
        return y

    def dsq_scan(self, codes: Tensor, scales: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 s_n: Tensor, static_scale: Tensor, dynamic: bool, per_byte: int, qmax: float) -> Tensor:
        """The quantized recurrence of a DSQ (or per-channel, s_n = 1) integer state over l tokens,
        round to nearest, reading and then writing the codes in place: codes (b, d, ceil(n /
        per_byte)) uint8 with two 4-bit or four 2-bit codes per byte, or (b, d, n) int8; scales
        (b, d, 1) float16 when dynamic; x, dt (b, l, d); A (d, 1) or (d, n); B, C (b, l, g, n); s_n
        (n,); static_scale (d, 1). Returns y (b, l, d) float32 =
        <stored h_t, C_t> (without D x_t)."""
        assert codes.is_contiguous() and scales.is_contiguous()
        b, length, d = x.shape
        g, n = B.shape[-2:]
        x, dt, A, B, C, s_n, static_scale = (t.float().contiguous() for t in (x, dt, A, B, C, s_n, static_scale))
        y = torch.empty(b, length, d, dtype=torch.float32)
        self.lib.dsq_scan(b, length, d, n, g, A.shape[-1], _ptr(codes), _ptr(scales) if dynamic else None, _ptr(x),
                          _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(s_n), _ptr(static_scale), int(dynamic),
                          int(per_byte), float(qmax), _ptr(y), self._n_threads())
        return y

    def mamba2_conv_step(self, xbc: Tensor, scale: float, state: Tensor, weight: Tensor,
                         bias: Optional[Tensor]) -> Tensor:
        """One token of Mamba2's depthwise causal conv on its int8 conv state (codes of the static
        8-bit conv input scale `scale`), updated in place: xbc (b, cd) float32 (rows may be a
        slice of a wider tensor), state (b, cd, w - 1) int8, weight (cd, 1, w), bias (cd,) or
        None. Returns the conv output (b, cd) float32, before the SiLU."""
        assert state.dtype == torch.int8 and state.is_contiguous()
        b, cd = xbc.shape
        w = weight.shape[-1]
        if xbc.dtype != torch.float32 or xbc.stride(-1) != 1:
            xbc = xbc.float().contiguous()
        weight, bias = _f32c(weight), None if bias is None else _f32c(bias)      # (cd, 1, w): rows of w
        out = torch.empty(b, cd, dtype=torch.float32)
        self.lib.mamba2_conv_step(b, cd, w, _ptr(xbc), xbc.stride(0), float(scale), _ptr(state), _ptr(weight),
                                  _ptr(bias), _ptr(out), self._n_threads())
        return out

    def mamba2_ssm_step(self, xbc: Tensor, dt: Tensor, z: Tensor, act_scales: tuple, A: Tensor, D: Tensor,
                        codes: Tensor, scales: Tensor, s_n: Tensor, static_scale: Tensor, dynamic: bool,
                        per_byte: int, qmax: float, headdim: int, ngroups: int) -> tuple[Tensor, Tensor]:
        """The SSM part of one Mamba2 decode token after the conv's SiLU: the static 8-bit
        quantizers of x, B, C, dt and z (`act_scales` = their scales, in that order), one token
        of `dsq_scan` on the integer state (codes and scales updated in place) and D x. xbc
        (b, d + 2 g n) float32; dt (b, h) float32 after softplus; z (b, d) float32 (rows may be a
        slice); A (d, 1); D (d,); the rest as `dsq_scan`. Returns y (b, d) = <h, C> + D x and the
        quantized z (b, d)."""
        assert codes.is_contiguous() and scales.is_contiguous()
        b, d = z.shape
        n = s_n.shape[0]
        xbc, dt, A, D, s_n, static_scale = (_f32c(t) for t in (xbc, dt, A, D, s_n, static_scale))
        if z.dtype != torch.float32 or z.stride(-1) != 1:
            z = z.float().contiguous()
        y, zq = torch.empty(b, d, dtype=torch.float32), torch.empty(b, d, dtype=torch.float32)
        scratch = torch.empty(2 * b * d + 2 * b * ngroups * n, dtype=torch.float32)
        self.lib.mamba2_ssm_step(b, d, n, ngroups, headdim, _ptr(xbc), _ptr(dt), _ptr(z), z.stride(0),
                                 *(float(s) for s in act_scales), _ptr(A), _ptr(D), _ptr(codes),
                                 _ptr(scales) if dynamic else None, _ptr(s_n), _ptr(static_scale), int(dynamic),
                                 int(per_byte), float(qmax), _ptr(y), _ptr(zq), _ptr(scratch), self._n_threads())
        return y, zq

    def mamba2_model_step(self, layers: Mamba2Layers, hidden: Tensor) -> Tensor:
        """One decode token through every layer (a `Mamba2Layer` each, all of one batch b): hidden
        (b, D) float32 contiguous, the residual stream, updated in place and returned; the
        layers' conv states, codes and scales updated in place."""
        assert hidden.dtype == torch.float32 and hidden.is_contiguous()
        b, structs = hidden.shape[0], ctypes.addressof(layers.c_array())
        scratch = layers.scratch.get(b)
        if scratch is None:
            n = self.lib.mamba2_model_step_scratch(len(layers), structs, b)
            scratch = layers.scratch[b] = torch.empty((n + 7) // 8, dtype=torch.float64)
        self.lib.mamba2_model_step(len(layers), structs, b, _ptr(hidden), _ptr(scratch), self._n_threads())
        return hidden


def _self_test(lib: ctypes.CDLL, isa: str) -> None:
    """Every entry point on tiny inputs (both lanes of each loop: vector blocks and tails) against
    PyTorch; raises RuntimeError on any difference. Inputs are small integers so that the
    products are exact whatever the summation order: equality is required, except for exp."""
    g = torch.Generator().manual_seed(0)
    k = NativeKernels(lib, isa, threads=1)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g)

    def check(what: str, ok: bool):
        if not ok:
            raise RuntimeError(f"self-test of {what} failed: it disagrees with PyTorch")

    built = lib.qmamba_isa().decode()
    if built != isa:
        raise RuntimeError(f"the library is the {built} build, not {isa}")
    for n_k, gs in ((64, 32), (40, 0), (200, 0)):   # vector blocks of four rows / scalar tails
        q_x, w = ints(-127, 127, 5, n_k).to(torch.int8), ints(-127, 127, 6, n_k).to(torch.int8)
        bias = ints(-50, 50, 6).float()
        exact = (q_x.long() @ w.long().t()).float() + bias
        for _ in range(3):                          # row sums: summed in the kernel, cached, reused
            out = k.i8_linear(q_x, torch.ones(5), w, torch.ones(6, n_k // (gs or n_k)), gs, bias)
            check("i8_linear", torch.equal(out, exact))
    x, w = torch.randn(3, 64, generator=g), ints(-127, 127, 6, 64).to(torch.int8)
    for static in (None, 0.02):
        s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127 if static is None else torch.tensor(static)
        q = torch.round(x / s).clamp(-127, 127).long()
        ref = s.reshape(-1, 1) * (q @ w.long().t()).float()
        check("i8_linear_f32", torch.equal(k.i8_linear_quantizing(x, static, w, torch.ones(6), 0, None), ref))
    for m in (1, 3):                                 # M = 1 converts in registers, M > 1 a float block
        x, w = ints(-8, 8, m, 20).float(), ints(-127, 127, 6, 20).to(torch.int8)
        check("f32i8_linear", torch.equal(k.f32i8_linear(x, w, torch.full((6,), 0.5)), (x @ w.float().t()) * 0.5))
    x = torch.linspace(-10.0, 2.0, 19)
    check("exp_f32", torch.allclose(k.exp_f32(x), torch.exp(x), rtol=1e-6, atol=0))
    for n, per_byte, n_a in ((16, 1, 16), (16, 2, 1), (5, 1, 1)):    # vector / packed / scalar
        b, d, length = 1, 2, 2
        q0 = ints(-1, 1, b, d, n).to(torch.int8)
        codes = pack_codes(q0, per_byte).clone().contiguous()     # written in place
        B, C = ints(-2, 2, b, length, 1, n).float(), ints(-3, 3, b, length, 1, n).float()
        ones = torch.ones(b, length, d)
        y = k.dsq_scan(codes, torch.empty(0), ones, ones, torch.zeros(d, n_a), B, C, torch.ones(n),
                       torch.ones(d, 1), False, per_byte, 7.0)
        h = q0.float()                            # exp(0) = 1, dt = x = 1, scales 1: exact
        ys = []
        for t in range(length):
            h = (h + B[:, t]).round().clamp(-7, 7)
            ys.append((h * C[:, t]).sum(-1))
        check("dsq_scan", torch.equal(unpack_codes(codes, per_byte, n), h.to(torch.int8))
              and torch.equal(y, torch.stack(ys, 1)))
    b, cd, w = 2, 5, 4                               # Mamba2's fused decode pieces, integer-valued
    state, x = ints(-3, 3, b, cd, w - 1).to(torch.int8), ints(-3, 3, b, cd).float()
    wt, bias = ints(-2, 2, cd, 1, w).float(), ints(-2, 2, cd).float()
    window = torch.cat([state.float(), x[..., None]], -1)
    out = k.mamba2_conv_step(x, 1.0, state, wt, bias)
    check("mamba2_conv_step", torch.equal(out, (window * wt[:, 0]).sum(-1) + bias)
          and torch.equal(state, window[..., 1:].to(torch.int8)))
    d, n, hd = 4, 16, 2
    q0 = ints(-1, 1, b, d, n).to(torch.int8)
    codes = pack_codes(q0, 2).clone().contiguous()
    xbc, z = ints(-1, 1, b, d + 2 * n).float(), ints(-3, 3, b, d).float()
    y, zq = k.mamba2_ssm_step(xbc, torch.ones(b, d // hd), z, (1.0,) * 5, torch.zeros(d, 1), torch.ones(d), codes,
                              torch.empty(0), torch.ones(n), torch.ones(d, 1), False, 2, 7.0, hd, 1)
    xs, B, C = xbc.split([d, n, n], -1)
    h = (q0.float() + xs[..., None] * B[:, None]).round().clamp(-7, 7)
    check("mamba2_ssm_step", torch.equal(unpack_codes(codes, 2, n), h.to(torch.int8)) and torch.equal(zq, z)
          and torch.equal(y, (h * C[:, None]).sum(-1) + xs))


def _checked(path: Path, isa: str) -> ctypes.CDLL:
    """The library at `path`, bound and self-tested (raises if either fails)."""
    lib = _bind(path)
    _self_test(lib, isa)
    return lib


def _load(isa: str) -> Optional[NativeKernels]:
    """One build, loaded once per process (None, with the reason in `_errors`, if it fails)."""
    if isa not in _native and isa not in _errors:
        try:
            _native[isa] = NativeKernels(cpu_build.verified(isa, lambda path: _checked(path, isa)), isa)
        except Exception as e:          # never let a broken kernel stop a command: the next build
            _errors[isa] = " ".join(str(e).split())[:600] if isinstance(e, RuntimeError) else cpu_build.one_line(e)
    return _native.get(isa)


def select(forced: Optional[str] = None) -> Optional[NativeKernels]:
    """The best build allowed (`forced`: a ceiling, see cpu_features.candidates) that loads, or
    None: switched off, or no build works (one warning line then)."""
    global _error
    if forced in _chosen:
        isa = _chosen[forced]
        return None if isa is None else _native[isa]
    with _lock:
        if forced not in _chosen:
            chosen = None
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _error = f"disabled by {DISABLE_ENV}"
            else:
                tried = cpu_features.candidates(forced)     # (a QMambaError for a bad QMAMBA_CPU_ISA)
                for isa in tried:
                    if _load(isa) is not None:
                        chosen = isa
                        break
                    log.debug("qmamba: the %s C kernels are unavailable (%s)", isa, _errors[isa])
                if chosen is None:
                    _error = _errors[tried[0]]
                    log.warning("qmamba: C kernels unavailable, using the slower PyTorch path: %s", _error)
                elif chosen != tried[0]:
                    _error = f"{tried[0]}: {_errors[tried[0]]}"
            _chosen[forced] = chosen
    isa = _chosen[forced]
    return None if isa is None else _native[isa]


def native(isa: str) -> Optional[NativeKernels]:
    """The kernels of exactly this build if the CPU runs it and it loads, else None."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or isa not in cpu_features.runnable():
        return None
    with _lock:
        return _load(isa)


def error(isa: str) -> Optional[str]:
    """Why `native(isa)` is None (None if it loaded or was never tried)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"disabled by {DISABLE_ENV}"
    if isa not in cpu_features.runnable():
        return cpu_features.why_not(isa)
    return _errors.get(isa)


def reset() -> None:
    """Forget every loaded build and choice, as in a new process (tests)."""
    global _error
    with _lock:
        _native.clear()
        _errors.clear()
        _chosen.clear()
        _error = None


def available() -> bool:
    """True when a build is loaded (or loadable), verified, and this CPU runs it."""
    return select() is not None


def unavailable_reason() -> Optional[str]:
    """Why the best build is not in use (None when it is)."""
    select()
    return _error


def isa() -> Optional[str]:
    """The build the module functions call, None when the kernels are unavailable."""
    k = select()
    return None if k is None else k.isa
