"""The AVX2 kernels of `kernels/int8_cpu.c` (integer GEMMs of the quantized linears, the DSQ step
of the integer state cache), compiled on first use and called through ctypes.

PyTorch's own int8 CPU kernels (`torch._int_mm`, `_weight_int8pack_mm`) are built for CPUs with
VNNI/AMX; on a plain AVX2 CPU they are slower than the float GEMV they should replace (measured:
benchmarks/README.md). This small C file is the fast path there. It is compiled once with the
system C compiler (`$CC`, else gcc, else cc) into a cache folder ($QMAMBA_CACHE/kernels, default
~/.cache/qmamba/kernels) under a name that holds the hash of the source, the flags and the
machine type, and reused. A cached library is never trusted blindly: after loading, every entry
point must exist and pass a small self-test against the PyTorch computation it replaces
(`_self_test`); otherwise it is rebuilt (into a temporary file, checked, then renamed over the
cached name, so concurrent processes never see half a file) and, if that fails too, callers fall
back to PyTorch's ops after one warning line on the "qmamba" logger. Where the CPU lacks AVX2
(as PyTorch sees it: `ATEN_CPU_CAPABILITY=default` simulates that) or `QMAMBA_NO_CPU_KERNELS=1`
is set, `available()` is False without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "int8_cpu.c"
# -ffp-contract=off: no fused multiply-adds the source does not write (dsq_scan rounds like eager)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
SYMBOLS = ("i8_linear", "i8_linear_f32", "f32i8_linear", "exp_f32", "dsq_scan")
STALE_BUILD_S = 3600            # temporary build files older than this are left-overs of a killed build

log = logging.getLogger("qmamba")
_lib = None
_error: Optional[str] = None
_lock = threading.Lock()        # one build and self-test at a time (the self-test swaps _lib)


def cache_dir() -> Path:
    return Path(os.environ.get("QMAMBA_CACHE") or Path.home() / ".cache" / "qmamba") / "kernels"


def cache_path() -> Path:
    """Where the compiled library of this source, these flags and this machine type is cached."""
    key = SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.machine().encode()
    return cache_dir() / f"int8_cpu-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _bind(path: Path) -> ctypes.CDLL:
    """Load a compiled library and declare its entry points (AttributeError if one is missing)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32]
    lib.f32i8_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.i8_linear_f32.argtypes = [i64, i64, i64, ptr, ctypes.c_float, i32, ptr, ptr, i64, ptr, ptr, ptr, i32]
    lib.dsq_scan.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                             i32, i32, ctypes.c_float, ptr, i32]
    lib.exp_f32.argtypes = [i64, ptr, ptr]
    for name in SYMBOLS:
        getattr(lib, name).restype = None
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Every entry point on tiny inputs (both lanes of each loop: vector blocks and tails) against
    PyTorch; raises RuntimeError on any difference. Inputs are small integers so that the
    products are exact whatever the summation order: equality is required, except for exp."""
    from .primitives import pack_codes, unpack_codes

    g = torch.Generator().manual_seed(0)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g)

    def check(what: str, ok: bool):
        if not ok:
            raise RuntimeError(f"self-test of {what} failed: it disagrees with PyTorch")

    _testing.lib = lib                  # the wrappers of this thread call `lib`, on one thread
    try:
        for k, gs in ((64, 32), (40, 0)):           # vector blocks of four rows / the scalar tail
            q_x, w = ints(-127, 127, 5, k).to(torch.int8), ints(-127, 127, 6, k).to(torch.int8)
            bias = ints(-50, 50, 6).float()
            out = i8_linear(q_x, torch.ones(5), w, torch.ones(6, k // (gs or k)), gs, bias)
            check("i8_linear", torch.equal(out, (q_x.long() @ w.long().t()).float() + bias))
        x, w = torch.randn(3, 64, generator=g), ints(-127, 127, 6, 64).to(torch.int8)
        for static in (None, 0.02):
            s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127 if static is None else torch.tensor(static)
            q = torch.round(x / s).clamp(-127, 127).long()
            ref = s.reshape(-1, 1) * (q @ w.long().t()).float()
            check("i8_linear_f32", torch.equal(i8_linear_quantizing(x, static, w, torch.ones(6), 0, None), ref))
        for m in (1, 3):                             # M = 1 converts in registers, M > 1 a float block
            x, w = ints(-8, 8, m, 20).float(), ints(-127, 127, 6, 20).to(torch.int8)
            check("f32i8_linear", torch.equal(f32i8_linear(x, w, torch.full((6,), 0.5)),
                                              (x @ w.float().t()) * 0.5))
        x = torch.linspace(-10.0, 2.0, 19)
        check("exp_f32", torch.allclose(exp_f32(x), torch.exp(x), rtol=1e-6, atol=0))
        for n, per_byte, n_a in ((16, 1, 16), (16, 2, 1), (5, 1, 1)):    # vector / packed / scalar
            b, d, length = 1, 2, 2
            q0 = ints(-1, 1, b, d, n).to(torch.int8)
            codes = pack_codes(q0, per_byte).clone().contiguous()     # written in place
            B, C = ints(-2, 2, b, length, 1, n).float(), ints(-3, 3, b, length, 1, n).float()
            ones = torch.ones(b, length, d)
            y = dsq_scan(codes, torch.empty(0), ones, ones, torch.zeros(d, n_a), B, C, torch.ones(n),
                         torch.ones(d, 1), False, per_byte, 7.0)
            h = q0.float()                            # exp(0) = 1, dt = x = 1, scales 1: exact
            ys = []
            for t in range(length):
                h = (h + B[:, t]).round().clamp(-7, 7)
                ys.append((h * C[:, t]).sum(-1))
            check("dsq_scan", torch.equal(unpack_codes(codes, per_byte, n), h.to(torch.int8))
                  and torch.equal(y, torch.stack(ys, 1)))
    finally:
        _testing.lib = None


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    return cc


def _build_dir(out: Path) -> Path:
    """The cache folder, or a private temporary one where the cache cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if os.access(out.parent, os.W_OK):
            for old in out.parent.glob(".int8_cpu-build-*"):   # a killed build's left-overs
                try:
                    if time.time() - old.stat().st_mtime > STALE_BUILD_S:
                        old.unlink()
                except OSError:
                    pass
            return out.parent
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="qmamba-kernels-"))


def _compile_and_check(out: Path) -> ctypes.CDLL:
    """Compile into a temporary file next to `out`, load and self-test it, then rename it to
    `out` (atomic: a concurrent reader or builder sees the old file or the new one, whole). The
    library is loaded from its temporary name: dlopen of a name already loaded in this process
    (a bad cached file) would return the old library."""
    cc = _compiler()
    folder = _build_dir(out)
    fd, tmp = tempfile.mkstemp(prefix=".int8_cpu-build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        try:
            r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the C compiler {cc!r} ran for more than 10 minutes") from None
        except OSError as e:
            raise RuntimeError(f"cannot run the C compiler {cc!r}: {e.strerror or e}") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} with {cc} failed: {last[-200:]}")
        lib = _bind(Path(tmp))
        _self_test(lib)
        if folder == out.parent:
            os.replace(tmp, out)
        return lib
    finally:                            # (a loaded library stays mapped once its file is gone)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if folder != out.parent:
            shutil.rmtree(folder, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _build() -> ctypes.CDLL:
    """The verified library: the cached one if it loads and passes the self-test, else rebuilt."""
    out = cache_path()
    if out.exists():
        try:
            lib = _bind(out)
            _self_test(lib)
            return lib
        except Exception as e:          # garbage, a missing symbol, wrong numbers: rebuild it
            bad = _one_line(e).replace(f"{out}: ", "")
        try:
            lib = _compile_and_check(out)
        except Exception as e:
            raise RuntimeError(f"the cached {out} is unusable ({bad}) and rebuilding it failed "
                               f"({_one_line(e)})") from None
        log.warning("qmamba: the cached C kernel %s was unusable (%s); rebuilt it", out, bad)
        return lib
    return _compile_and_check(out)


def available() -> bool:
    """True when the kernels are built (or buildable), verified, and this CPU runs them."""
    if _lib is not None:
        return True
    if _error is not None:
        return False
    with _lock:
        if _lib is None and _error is None:
            _load()
    return _lib is not None


def _load() -> None:
    global _lib, _error
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("QMAMBA_NO_CPU_KERNELS", "") not in ("", "0"):
        _error = "disabled by QMAMBA_NO_CPU_KERNELS"
    elif capability not in ("AVX2", "AVX512") or platform.machine().lower() not in ("x86_64", "amd64"):
        _error = f"CPU capability {capability} lacks AVX2"
    else:
        try:
            _lib = _build()
        except Exception as e:          # never let a broken kernel stop a command: PyTorch's path
            _error = " ".join(str(e).split())[:600] if isinstance(e, RuntimeError) else _one_line(e)
            log.warning("qmamba: C kernels unavailable, using the slower PyTorch path: %s", _error)


def unavailable_reason() -> Optional[str]:
    available()
    return _error


_testing = threading.local()    # .lib: the library under self-test in this thread


def _get() -> ctypes.CDLL:
    lib = getattr(_testing, "lib", None)
    if lib is None:
        assert available(), _error
        lib = _lib
    return lib


def _threads() -> int:
    # one thread in the self-test: a parallel region can cost milliseconds on a busy machine
    return 1 if getattr(_testing, "lib", None) is not None else torch.get_num_threads()


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def i8_linear(q_x: Tensor, s_x: Tensor, codes: Tensor, w_scale: Tensor, group_size: int,
              bias: Optional[Tensor]) -> Tensor:
    """(M, K) int8 activations with (M,) float32 scales x (N, K) int8 weights with (N, G) float32
    scales (G = K / `group_size` groups of columns; G = 1 per channel) -> (M, N) float32. Weight
    codes must be in [-127, 127] (the kernel cannot negate -128; loading refuses it); the integer
    sums are exact for any K (int64 across chunks of 65536 columns)."""
    m, k = q_x.shape
    codes, w_scale, gs, bias, out = _int8_weights(m, k, codes, w_scale, group_size, bias)
    q_x, s_x = q_x.contiguous(), s_x.float().expand(m).contiguous()
    _get().i8_linear(m, out.shape[1], k, _ptr(q_x), _ptr(s_x), _ptr(codes), _ptr(w_scale), gs, _ptr(bias), _ptr(out),
                   _threads())
    return out


def _int8_weights(m: int, k: int, codes: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor]):
    """The weight-side arguments of the int8 GEMMs in the kernel's layout, and the (M, N) output."""
    _get()
    n = codes.shape[0]
    gs = group_size or k
    if k % gs or codes.shape[1] != k:
        raise ValueError(f"int8 product: the inner size {k} must match the weight's ({codes.shape[1]}) "
                         f"and be a multiple of the group size {gs}")
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
    _get().i8_linear_f32(m, out.shape[1], k, _ptr(x), 0.0 if static_scale is None else float(static_scale),
                       int(static_scale is None), _ptr(codes), _ptr(w_scale), gs, _ptr(bias), _ptr(out), _ptr(s_x),
                       _threads())
    return out


def f32i8_linear(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """(M, K) float32 x (N, K) int8 weights with (N,) float32 row scales -> (M, N) float32."""
    _get()
    m, k = x.shape
    n = codes.shape[0]
    x, codes = x.float().contiguous(), codes.contiguous()
    scale = scale.float().reshape(n).contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    _get().f32i8_linear(m, n, k, _ptr(x), _ptr(codes), _ptr(scale), _ptr(out), _threads())
    return out


def exp_f32(x: Tensor) -> Tensor:
    """exp of float32 values with the kernel's vectorised exp (the per-state decays of dsq_scan)."""
    _get()
    x = x.float().contiguous()
    y = torch.empty_like(x)
    _get().exp_f32(x.numel(), _ptr(x), _ptr(y))
    return y


def dsq_scan(codes: Tensor, scales: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static_scale: Tensor, dynamic: bool, per_byte: int, qmax: float) -> Tensor:
    """The quantized recurrence of a DSQ (or per-channel, s_n = 1) integer state over l tokens,
    round to nearest, reading and then writing the codes in place: codes (b, d, ceil(n /
    per_byte)) uint8 with two 4-bit or four 2-bit codes per byte, or (b, d, n) int8; scales
    (b, d, 1) float16 when dynamic; x, dt (b, l, d); A (d, 1) or (d, n); B, C (b, l, g, n); s_n
    (n,); static_scale (d, 1). Returns y (b, l, d) float32 =
    <stored h_t, C_t> (without D x_t)."""
    _get()
    assert codes.is_contiguous() and scales.is_contiguous()
    b, length, d = x.shape
    g, n = B.shape[-2:]
    x, dt, A, B, C, s_n, static_scale = (t.float().contiguous() for t in (x, dt, A, B, C, s_n, static_scale))
    y = torch.empty(b, length, d, dtype=torch.float32)
    _get().dsq_scan(b, length, d, n, g, A.shape[-1], _ptr(codes), _ptr(scales) if dynamic else None, _ptr(x),
                  _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _ptr(s_n), _ptr(static_scale), int(dynamic), int(per_byte),
                  float(qmax), _ptr(y), _threads())
    return y
