"""The exact per-token quantized recurrence, fast: one fused step per token.

    h_t = Q(exp(dt_t A) h_{t-1} + dt_t x_t B_t),   y_t = <h_t, C_t> + D x_t

`selective_scan_ref(..., state_fn=quantizer)` is the reference (about ten elementwise passes
over the (b, d, n) state per token); here the update, the quantize-dequantize and the read-out of
one token are one function, compiled by `torch.compile` (inductor fuses them into one loop) where
a compiler is available, eager otherwise. Same numbers as the reference up to float rounding,
stochastic rounding included: the same seeded draws in the same order (tests/quant/test_state.py).
Used for evaluation (no gradient); calibration and reconstruction go through other paths.

Shapes use the glossary of `qmamba.models.scan`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from ..models.scan import _per_channel

log = logging.getLogger("qmamba")
_COMPILED: dict = {}


def make_step(kind: str, dynamic: bool, qmax: float, heads: int, group: int, stochastic: bool = False):
    """The fused token step for one quantizer layout (constants baked in). With stochastic
    rounding, u (b, d, n) holds the step's uniform draws: floor(v / scale + u)."""

    def step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static: Tensor, u: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        b, d = x.shape
        h = torch.exp(dt.unsqueeze(-1) * A) * h + (dt * x).unsqueeze(-1) * _per_channel(B, d)   # (b, d, n)
        if kind == "head":
            v = h.unflatten(1, (heads, d // heads))                         # (b, h, p, n)
            dims = (2, 3)
        elif kind == "group":
            v = h.unflatten(2, (h.shape[-1] // group, group))                # (b, d, n/gs, gs)
            dims = (3,)
        elif kind == "dsq":
            v = h / s_n
            dims = (2,)
        else:
            v = h
            dims = {"tensor": (1, 2), "channel": (2,), "state": (1,)}[kind]
        if dynamic:
            scale = (v.abs().amax(dim=dims, keepdim=True) / qmax).clamp(2.0 ** -24, 65504.0).half().float()
        else:
            scale = static
        if stochastic:                      # every view keeps (b, d, n)'s element order
            v = torch.floor(v / scale + u.view(v.shape)).clamp(-qmax, qmax) * scale
        else:
            v = torch.round(v / scale).clamp(-qmax, qmax) * scale         # quantize -> dequantize
        if kind == "head":
            h = v.flatten(1, 2)
        elif kind == "group":
            h = v.flatten(2, 3)
        elif kind == "dsq":
            h = v * s_n
        else:
            h = v
        y = (h * _per_channel(C, d)).sum(-1)                                # (b, d)
        return h, y

    return step


def compile_enabled() -> bool:
    """torch.compile for the quantized scan: on unless QMAMBA_COMPILE=0 (tests run eager)."""
    return os.environ.get("QMAMBA_COMPILE", "1") != "0"


def _step_for(q, device: torch.device):
    key = (q.kind, q.scale_mode == "dynamic", float(q.qmax), q.d // q.headdim, q.group_size,
           q.rounding == "stochastic", device.type)
    eager = make_step(*key[:6])
    if not compile_enabled():
        return eager, eager
    if key not in _COMPILED:
        fn = eager
        try:
            import torch._dynamo
            import torch._inductor.config

            # keep the float16 rounding of dynamic scales (inductor drops down/up casts unless told
            # to emulate them); static shapes: with dynamic=True inductor miscompiled this step
            # (codes clamped wrongly), so one graph per batch size, and a check against eager
            torch._inductor.config.emulate_precision_casts = True
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            fn = torch.compile(eager, dynamic=False)
        except Exception:          # no compiler backend here: eager it is
            pass
        _COMPILED[key] = fn
    return _COMPILED[key], eager


_CHECKED: set = set()


def _checked_step(q, device, args) -> object:
    """The compiled step, after checking it against eager on these inputs (once per layout and
    shape); on any mismatch or failure, eager for good (a miscompile must never change results)."""
    step, eager = _step_for(q, device)
    if step is eager:
        return eager
    key = (id(step), tuple(args[0].shape))
    if key in _CHECKED:
        return step
    try:
        h1, y1 = step(*args)
        h2, y2 = eager(*args)
        ok = torch.allclose(h1, h2, rtol=1e-5, atol=1e-6) and torch.allclose(y1, y2, rtol=1e-4, atol=1e-5)
    except Exception:
        ok = False
    if not ok:
        log.warning("qmamba: the compiled quantized scan disagrees with eager here; using eager")
        for k in [k for k, v in _COMPILED.items() if v is step]:
            _COMPILED[k] = eager
        return eager
    _CHECKED.add(key)
    return step


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
        h, y = step(*args)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * x.float()
    return y, h
