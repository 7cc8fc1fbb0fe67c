"""The AVX2 kernels of `kernels/int8_cpu.c` (integer GEMMs of the quantized linears, the DSQ step
of the integer state cache), compiled on first use and called through ctypes.

PyTorch's own int8 CPU kernels (`torch._int_mm`, `_weight_int8pack_mm`) are built for CPUs with
VNNI/AMX; on a plain AVX2 CPU they are slower than the float GEMV they should replace (measured:
benchmarks/README.md). This small C file is the fast path there. It is compiled once with the
system C compiler into a cache folder ($QMAMBA_CACHE, default ~/.cache/qmamba) and reused; where
there is no compiler, no AVX2/FMA, or the build fails, `available()` is False and callers fall
back to PyTorch's ops. `QMAMBA_NO_CPU_KERNELS=1` disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "int8_cpu.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-lm"]

_lib = None
_error: Optional[str] = None


def cache_dir() -> Path:
    return Path(os.environ.get("QMAMBA_CACHE", Path.home() / ".cache" / "qmamba")) / "kernels"


def _build() -> ctypes.CDLL:
    src = SOURCE.read_bytes()
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    tag = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"int8_cpu-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {r.stderr.strip()[-300:]}")
            os.replace(tmp, out)            # atomic: a concurrent build never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32]
    lib.f32i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.i8_linear_f32.argtypes = [i64, i64, i64, ptr, ctypes.c_float, i32, ptr, ptr, i64, ptr, ptr, ptr, i32]
    lib.i8_linear_f32.restype = None
    lib.dsq_scan.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                             i32, i32, ctypes.c_float, ptr, i32]
    lib.exp_f32.argtypes = [i64, ptr, ptr]
    lib.i8_linear.restype = lib.f32i8_linear.restype = lib.dsq_scan.restype = lib.exp_f32.restype = None
    return lib


def available() -> bool:
    """True when the kernels are built (or buildable) and this CPU runs them."""
    global _lib, _error
    if _lib is not None:
        return True
    if _error is not None:
        return False
    if os.environ.get("QMAMBA_NO_CPU_KERNELS"):
        _error = "disabled by QMAMBA_NO_CPU_KERNELS"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _error = f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2"
    else:
        try:
            _lib = _build()
        except (OSError, RuntimeError) as e:
            _error = str(e)
    return _lib is not None


def unavailable_reason() -> Optional[str]:
    available()
    return _error


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def i8_linear(q_x: Tensor, s_x: Tensor, codes: Tensor, w_scale: Tensor, group_size: int,
              bias: Optional[Tensor]) -> Tensor:
    """(M, K) int8 activations with (M,) float32 scales x (N, K) int8 weights with (N, G) float32
    scales (G groups of `group_size` columns; G = 1 per channel) -> (M, N) float32."""
    m, k = q_x.shape
    codes, w_scale, gs, bias, out = _int8_weights(m, k, codes, w_scale, group_size, bias)
    q_x, s_x = q_x.contiguous(), s_x.float().expand(m).contiguous()
    _lib.i8_linear(m, out.shape[1], k, _ptr(q_x), _ptr(s_x), _ptr(codes), _ptr(w_scale), gs, _ptr(bias), _ptr(out),
                   torch.get_num_threads())
    return out


def _int8_weights(m: int, k: int, codes: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor]):
    """The weight-side arguments of the int8 GEMMs in the kernel's layout, and the (M, N) output."""
    assert available(), _error
    n = codes.shape[0]
    gs = group_size or k
    bias = None if bias is None else bias.float().contiguous()
    return (codes.contiguous(), w_scale.float().reshape(n, k // gs).contiguous(), gs, bias,
            torch.empty(m, n, dtype=torch.float32))


def i8_linear_quantizing(x: Tensor, static_scale: Optional[float], codes: Tensor, w_scale: Tensor,
                         group_size: int, bias: Optional[Tensor]) -> Tensor:
    """`i8_linear` of float activations (M, K) that the kernel quantizes to int8 itself: with
    the per-tensor `static_scale`, or per row (dynamic) when it is None."""
    m, k = x.shape
    codes, w_scale, gs, bias, out = _int8_weights(m, k, codes, w_scale, group_size, bias)
    x, s_x = x.float().contiguous(), torch.empty(m, dtype=torch.float32)
    _lib.i8_linear_f32(m, out.shape[1], k, _ptr(x), 0.0 if static_scale is None else float(static_scale),
                       int(static_scale is None), _ptr(codes), _ptr(w_scale), gs, _ptr(bias), _ptr(out), _ptr(s_x),
                       torch.get_num_threads())
    return out


def f32i8_linear(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """(M, K) float32 x (N, K) int8 weights with (N,) float32 row scales -> (M, N) float32."""
    assert available(), _error
    m, k = x.shape
    n = codes.shape[0]
    x, codes = x.float().contiguous(), codes.contiguous()
    scale = scale.float().reshape(n).contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    _lib.f32i8_linear(m, n, k, _ptr(x), _ptr(codes), _ptr(scale), _ptr(out), torch.get_num_threads())
    return out


def exp_f32(x: Tensor) -> Tensor:
    """exp of float32 values with the kernel's vectorised exp (the per-state decays of dsq_scan)."""
    assert available(), _error
    x = x.float().contiguous()
    y = torch.empty_like(x)
    _lib.exp_f32(x.numel(), _ptr(x), _ptr(y))
    return y


def dsq_scan(codes: Tensor, scales: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static_scale: Tensor, dynamic: bool, per_byte: int, qmax: float) -> Tensor:
    """The quantized recurrence of a DSQ (or per-channel, s_n = 1) integer state over l tokens,
    round to nearest, reading and then writing the codes in place: codes (b, d, ceil(n /
    per_byte)) uint8 with two 4-bit or four 2-bit codes per byte, or (b, d, n) int8; scales
    (b, d, 1) float16 when dynamic; x, dt (b, l, d); A (d, 1) or (d, n); B, C (b, l, g, n); s_n
    (n,); static_scale (d, 1). Returns y (b, l, d) float32 =
    <stored h_t, C_t> (without D x_t)."""
    assert available(), _error
    assert codes.is_contiguous() and scales.is_contiguous()
    b, length, d = x.shape
    g, n = B.shape[-2:]
    x, dt, A, B, C, s_n, static_scale = (t.float().contiguous() for t in (x, dt, A, B, C, s_n, static_scale))
    y = torch.empty(b, length, d, dtype=torch.float32)
    _lib.dsq_scan(b, length, d, n, g, A.shape[-1], _ptr(codes), _ptr(scales) if dynamic else None, _ptr(x),
                  _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(s_n), _ptr(static_scale), int(dynamic), int(per_byte),
                  float(qmax), _ptr(y), torch.get_num_threads())
    return y
