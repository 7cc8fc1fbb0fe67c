"""The exact per-token quantized recurrence, fast: one fused step per token.

    h_t = Q(exp(dt_t A) h_{t-1} + dt_t x_t B_t),   y_t = <h_t, C_t> + D x_t

`selective_scan_ref(..., state_fn=quantizer)` is the reference (about ten elementwise passes
over the (b, d, n) state per token); here the update, the quantize-dequantize and the read-out of
one token are one function, compiled by `torch.compile` (inductor fuses them into one loop) where
a compiler is available, eager otherwise. Same numbers as the reference up to float rounding,
stochastic rounding included: the same seeded draws in the same order (tests/quant/test_state.py).
Used for evaluation (no gradient); calibration and reconstruction go through other paths.

`cache_step` is the same token step on the integer cache of decoding: it reads the packed codes
and scales of one layer, updates in float32, re-quantizes and writes the packed codes and new
scales back, and returns the read-out; compiled, the layer's float state lives only in registers.

Shapes use the glossary of `qmamba.models.scan.reference`.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..models.scan.reference import per_channel
from ..kernels import lookup as kernel_lookup
from .primitives import codes_per_byte, pack_codes, unpack_codes

log = logging.getLogger("qmamba")
_COMPILED: dict = {}
# token steps run so far, per implementation ("compiled", "eager", "kernel"): which path really
# ran is observable (a silent fall-back to eager would otherwise look like a working compile)
runs: collections.Counter = collections.Counter()
_EAGER: "weakref.WeakSet" = weakref.WeakSet()      # the eager steps make_step / make_cache_step built


def _requantize(h: Tensor, layout, dynamic: bool, qmax: float, s_n: Tensor, static: Tensor,
                 u: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """h (b, d, n) -> (codes as float in the layout's view, scale of that view)."""
    v = layout.view(h, s_n)
    scale = layout.dynamic_scale(v, qmax) if dynamic else static
    if u is not None:                       # stochastic; every view keeps (b, d, n)'s element order
        q = torch.floor(v / scale + u.view(v.shape)).clamp(-qmax, qmax)
    else:
        q = torch.round(v / scale).clamp(-qmax, qmax)
    return q, scale


def make_step(layout, dynamic: bool, qmax: float, stochastic: bool = False):
    """The fused token step for one quantizer layout (a `StateLayout`; constants baked in). With
    stochastic rounding, u (b, d, n) holds the step's uniform draws: floor(v / scale + u)."""

    def step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static: Tensor, u: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        b, d = x.shape
        h = torch.exp(dt.unsqueeze(-1) * A) * h + (dt * x).unsqueeze(-1) * per_channel(B, d)   # (b, d, n)
        q, scale = _requantize(h, layout, dynamic, qmax, s_n, static, u)
        h = layout.unview(q * scale, s_n)                                   # quantize -> dequantize
        y = (h * per_channel(C, d)).sum(-1)                                # (b, d)
        return h, y

    _EAGER.add(step)
    return step


def make_cache_step(layout, dynamic: bool, qmax: float, stochastic: bool, per_byte: int):
    """The token step on a stored integer state: codes (b, d, n / per_byte) uint8 (two 4-bit or
    four 2-bit codes per byte) or (b, d, n) int8 (per_byte = 1), scales float16 in the
    layout's dynamic shape (unused when static). Returns the new codes, the new scales and
    y (b, d) (without D x)."""

    def step(codes: Tensor, scales: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static: Tensor, u: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        b, d = x.shape
        q = layout.split(unpack_codes(codes, per_byte, B.shape[-1]).float())     # (b, d, n) viewed
        h = layout.unview(q * (scales.float() if dynamic else static), s_n)      # read
        h = torch.exp(dt.unsqueeze(-1) * A) * h + (dt * x).unsqueeze(-1) * per_channel(B, d)
        q, scale = _requantize(h, layout, dynamic, qmax, s_n, static, u)
        y = (layout.unview(q * scale, s_n) * per_channel(C, d)).sum(-1)         # (b, d)
        q = layout.merge(q).to(torch.int8)
        return pack_codes(q, per_byte), (scale.half() if dynamic else scales), y

    _EAGER.add(step)
    return step


def compile_enabled() -> bool:
    """torch.compile for the quantized scan: on unless QMAMBA_COMPILE=0 (tests run eager)."""
    return os.environ.get("QMAMBA_COMPILE", "1") != "0"


def _layout(q, device: torch.device) -> tuple:
    return (q.layout, q.scale_mode == "dynamic", float(q.qmax), q.rounding == "stochastic")


def _own_inductor_cache() -> None:
    """Inductor keys its on-disk cache without ATEN_CPU_CAPABILITY: kernels cached by a run at
    this CPU's best ISA come back under ATEN_CPU_CAPABILITY=avx2 computing NaN or garbage, and
    under =default fail to build (measured with torch 2.13 on an AVX-512 CPU; the check against
    eager then falls back). With the capability overridden, and no cache folder chosen by the
    user, compiled steps get a cache folder of that capability's own."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if not cap:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = default_cache_dir()
    # inductor writes its default into the environment on first use: that is not a user's choice
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default, os.path.abspath(default)):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(f"{default}-aten-{cap}")


def _compiled(key: tuple, eager):
    """torch.compile of `eager`, once per key; eager where compiling is off or impossible."""
    if not compile_enabled():
        return eager
    if key not in _COMPILED:
        fn = eager
        try:
            _own_inductor_cache()
            import torch._dynamo
            import torch._inductor.config

            # keep the float16 rounding of dynamic scales (inductor drops down/up casts unless told
            # to emulate them); static shapes: with dynamic=True inductor miscompiled this step
            # (codes clamped wrongly), so one graph per batch size, and a check against eager
            torch._inductor.config.emulate_precision_casts = True
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            fn = torch.compile(eager, dynamic=False)
        except Exception as e:     # no compiler backend here: eager it is
            log.warning("qmamba: torch.compile is unavailable here (%s: %s); the quantized scan runs "
                        "eagerly", type(e).__name__, e)
        _COMPILED[key] = fn
    return _COMPILED[key]


def _step_for(q, device: torch.device):
    key = _layout(q, device)
    eager = make_step(*key)
    return _compiled(("scan", key[0].key, *key[1:], device.type), eager), eager


def _cache_step_for(q, device: torch.device):
    key = (*_layout(q, device), codes_per_byte(q.bits, dense=True))
    eager = make_cache_step(*key)
    return _compiled(("cache", key[0].key, *key[1:], device.type), eager), eager


_CHECKED: set = set()


def _impl(step) -> str:
    return "eager" if step in _EAGER else "compiled"


def _agree(a, b) -> bool:
    """Outputs of the compiled and the eager step agree: float tensors closely, integer codes
    up to rare rounding-boundary flips (float rounding of exp may move a value across .5)."""
    for u, v in zip(a, b):
        if u.dtype.is_floating_point:
            if not torch.allclose(u.float(), v.float(), rtol=1e-4, atol=1e-5):
                return False
        elif (u != v).float().mean().item() > 1e-3:
            return False
    return True


def _checked(step, eager, args) -> object:
    """The compiled step, after checking it against eager on these inputs (once per layout and
    shape); on any mismatch or failure, eager for good (a miscompile must never change results)."""
    if step is eager:
        return eager
    key = (id(step), tuple(args[0].shape))
    if key in _CHECKED:
        return step
    why = "disagrees with eager"
    try:
        ok = _agree(step(*args), eager(*args))
    except Exception as e:         # e.g. no C++ compiler for inductor: compiling fails on first use
        first = (str(e).strip().splitlines() or [""])[0]
        ok, why = False, f"failed ({type(e).__name__}: {first})"
    if not ok:
        log.warning("qmamba: the compiled quantized step %s here; using eager", why)
        for k in [k for k, v in _COMPILED.items() if v is step]:
            _COMPILED[k] = eager
        return eager
    _CHECKED.add(key)
    return step


def _checked_step(q, device, args) -> object:
    return _checked(*_step_for(q, device), args)


def use_cpu_kernel(q, x: Tensor) -> bool:
    """The C kernel covers every state quantizer whose scale factors per row into a channel part
    and a state part (the scale modes of its layout's `kernel_modes`: DSQ and per-channel, static
    or dynamic; per-tensor, per-state-index and per-head, static); round to nearest, on CPU,
    where the kernel registry has a dsq_scan (`qmamba.kernels.forced("torch")` switches it off,
    for tests)."""
    ok = q.scale_mode in q.layout.kernel_modes
    return (ok and x.device.type == "cpu" and q.rounding == "nearest"
            and kernel_lookup("dsq_scan", x.device.type) is not None)


def _kernel_scales(q) -> tuple[Tensor, Tensor]:
    """The quantizer's scales as the kernel's state-axis s_n (n,) and channel s_c (d, 1) (the
    layout's `kernel_scales`)."""
    return q.layout.kernel_scales(q.static_scale.detach().clamp(min=1e-12), q.s_n.detach())


def kernel_scan(state, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The C kernel's recurrence over l tokens on a `QuantizedSSMState` (updated in place).
    x, dt (b, l, d); A (d, n) or (d, 1); B, C (b, l, g, n). Returns y (b, l, d) without D x."""
    q = state.quantizer
    s_n, s_c = _kernel_scales(q)
    scan = kernel_lookup("dsq_scan", x.device.type)
    return scan(state.codes, state.scales, x, dt, A, B, C, s_n, s_c, q.scale_mode == "dynamic",
                state.per_byte, float(q.qmax))


def cache_step(state, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One token on a `QuantizedSSMState` (updated in place). x, dt (b, d) float32; A (d, n) or
    (d, 1); B, C (b, g, n). Returns y (b, d) = <h_t, C_t> (D x_t is the caller's)."""
    q = state.quantizer
    if use_cpu_kernel(q, x):
        runs["kernel"] += 1
        return kernel_scan(state, x[:, None], dt[:, None], A, B[:, None], C[:, None])[:, 0]
    step, eager = _cache_step_for(q, x.device)
    u = q.noise(state.codes.shape[:2] + (q.n,), x.device) if q.rounding == "stochastic" else None
    args = (state.codes, state.scales, x, dt, A, B, C, q.s_n.detach().float(),
            q.static_scale.detach().float().clamp(min=1e-12), u)
    step = _checked(step, eager, args)
    runs[_impl(step)] += 1
    state.codes, state.scales, y = step(*args)
    return y


@torch.no_grad()
def quantized_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   quantizer, h0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Exact quantized recurrence, shapes as `selective_scan_ref`. Returns y (b, l, d), h_l."""
    b, length, d = x.shape
    h = x.new_zeros((b, d, B.shape[-1]), dtype=torch.float32) if h0 is None else h0.float()
    # time-major and contiguous: every step's slice has the same strides whatever the length
    # (torch.compile specialises on strides: (b, l, ...)[:, t] would recompile for every length)
    x32, dt32, B32, C32 = (v.float().transpose(0, 1).contiguous() for v in (x, dt, B, C))
    s_n = quantizer.s_n.detach().float()
    static = quantizer.static_scale.detach().float().clamp(min=1e-12)
    stochastic = quantizer.rounding == "stochastic"
    ys = []
    step = _step_for(quantizer, x.device)[1]              # eager for the first token, then the
    for t in range(length):                               # compiled step, checked on a live state
        u = quantizer.noise(h.shape, x.device) if stochastic else None
        args = (h, x32[t], dt32[t], A, B32[t], C32[t], s_n, static, u)
        if t == 1:
            step = _checked_step(quantizer, x.device, args)
        runs[_impl(step)] += 1
        h, y = step(*args)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * x.float()
    return y, h
