"""The quantized SSM state of qmamba's checkpoint extension, as an engine would implement it: a
pure-PyTorch reference of one decode step on the integer state (docs/checkpoint-format.md quotes
`state_step` verbatim; tests/formats/test_state_reference.py checks it against qmamba's own
decode step, bit for bit). Only torch is needed; nothing here is used by qmamba itself.

Per layer the engine keeps codes (b, d, n) in [-qmax, qmax], qmax = 2^(H-1) - 1 (stored two
4-bit or four 2-bit codes per byte, or int8), and, for dynamic scales, float16 per-write scales
in the shape of the kind's `scale` below; static scales and s_n come from the checkpoint."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def state_step(codes: Tensor, scales: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
               C: Tensor, *, kind: str, bits: int, s_n: Tensor, static_scale: Tensor, heads: int = 1,
               group: int = 8, u: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """One token. codes (b, d, n) int8; scales float16 (dynamic) or None (static); x, dt (b, d)
    float32 (dt after softplus, per channel); A (d, n) or (d, 1); B, C (b, g, n); u (b, d, n)
    uniform draws for stochastic rounding, None for round-to-nearest. Returns the new codes,
    the new scales and y (b, d) = <h, C> (the caller adds D x)."""
    qmax = 2 ** (bits - 1) - 1
    b, d, n = codes.shape
    sn = s_n if kind == "dsq" else torch.ones(n)                       # DSQ: h = s_c * s_n * q

    def view(t):                                                        # (b, d, n) -> scale layout
        return t.unflatten(1, (heads, d // heads)) if kind == "head" else \
            t.unflatten(2, (n // group, group)) if kind == "group" else t

    def unview(t):
        return t.flatten(1, 2) if kind == "head" else t.flatten(2, 3) if kind == "group" else t

    dims = {"tensor": (1, 2), "channel": (2,), "state": (1,), "head": (2, 3), "group": (3,), "dsq": (2,)}[kind]
    s = static_scale.clamp(min=1e-12) if scales is None else scales.float()
    h = unview(view(codes.float()) * s) * sn                            # 1. dequantize
    Bc, Cc = (t.repeat_interleave(d // t.shape[1], dim=1).float() for t in (B, C))   # (b, d, n)
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * Bc     # 2. update (float32)
    v = view(h / sn)                                                    # 3. requantize
    if scales is not None:                                              # dynamic: a new fp16 scale
        s = (v.abs().amax(dim=dims, keepdim=True) / qmax).clamp(2.0 ** -24, 65504.0).half().float()
    q = (torch.round(v / s) if u is None else torch.floor(v / s + view(u))).clamp(-qmax, qmax)
    y = (unview(q * s) * sn * Cc).sum(-1)                               # 4. read-out, stored state
    return unview(q).to(torch.int8), None if scales is None else s.half(), y
