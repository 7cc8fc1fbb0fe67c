"""Quantizers of the SSM state cache, and the cache that stores the state as integers.

Shapes use the glossary of `qmamba.models.scan.reference`: the state is h (b, d, n), d channels (Mamba2:
h heads x p head dim) and n state indices. Every quantizer is symmetric with codes in
[-qmax, qmax], and differs only in how its scale is shared (its layout, one class per kind in
`qmamba.quant.state_layout`):

    tensor   s            one scale per layer (static) or per sequence (dynamic)
    channel  s[d]         per channel, shared along the state axis
    state    s[n]         per state index, shared along the channels
    head     s[h]         per head of p channels (Mamba1: p = 1, same as channel)
    group    s[d, n/gs]   per channel and group of gs state indices
    dsq      s_c[d] * s_n[n]   Decoupled Scale Quantization (Q-Mamba): a static state-axis scale
                              s_n from calibration (refined by ESR) times a channel scale s_c,
                              computed at every write (dynamic) or fixed (static)

"dynamic" scales are computed from the state at every write and stored beside the codes as
float16 (the fake quantizer rounds them to float16 too, so simulated and stored states agree
exactly); "static" scales come from calibration and cost nothing per write. Writes round to
nearest or stochastically (floor(v + U[0, 1)), seeded), which keeps small updates alive with
static scales (see docs/design.md).

Semantics (every metric): the state is re-quantized after every token; `forward(h)` is that
quantize-dequantize, `QuantizedSSMState` (`qmamba.quant.state_cache`) is the real integer cache
with the same numerics. Installed as a mixer's `state_quant`, the quantizer also runs the mixer's
scan (`scan`, `qmamba.quant.state_scan`) and allocates its cache (`allocate`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import QMambaError
from .primitives import EPS, qrange
from .state_cache import QuantizedSSMState
from .state_layout import make_layout
from .state_scan import quantized_state_scan

CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
DSQ_ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_SAMPLES = 64            # calibration state snapshots kept per layer for scale search
SAMPLE_BUDGET = 1 << 23     # ... and at most this many floats of them


class StateQuantizer(nn.Module):
    """Quantizer of one layer's SSM state (b, d, n); `forward` fake-quantizes (the state_fn of the
    exact recurrence), `quantize`/`dequantize` give and take integer codes and per-write scales."""

    def __init__(self, kind: str, bits: int, d: int, n: int, headdim: int = 1,
                 scale_mode: str = "dynamic", rounding: str = "nearest", group_size: int = 8,
                 seed: int = 0, where: str = ""):
        super().__init__()
        # the kind's scale layout (`qmamba.quant.state_layout`): views, scale shapes, kernel split
        self.layout = make_layout(kind, d, n, headdim=headdim, group_size=group_size)
        self.kind, self.bits, self.d, self.n = kind, bits, d, n
        self.headdim = self.layout.headdim
        self.scale_mode, self.rounding, self.group_size, self.where = scale_mode, rounding, group_size, where
        self.qmax = qrange(bits)[1]
        self.mode = "quant"
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        # calibrated |h| maxima over all tokens, the source of every static scale: (d, n) once
        # observed, empty until then (a quantized model loaded or built for decoding has none)
        self.register_buffer("amax", torch.zeros(0), persistent=False)
        # DSQ state-axis scale (learnable by ESR; geometric mean 1) and the static scale, whose
        # shape is the layout's; a clip factor shrinks static ranges
        self.s_n = nn.Parameter(torch.ones(n), requires_grad=False)
        self.static_scale = nn.Parameter(torch.ones(self.layout.static_shape()), requires_grad=False)
        self._samples: list[Tensor] = []
        self._seen = 0

    def extra_repr(self) -> str:
        return f"H{self.bits} {self.kind}, {self.scale_mode} scales, {self.rounding} rounding"

    # ---------------------------------------------------------------- scale layout
    def dynamic_shape(self, batch: int) -> tuple:
        """Shape of the per-write scales stored for a batch (empty when scales are static)."""
        if self.scale_mode == "static":
            return (batch, 0)
        return self.layout.dynamic_shape(batch)

    def _view(self, h: Tensor) -> Tensor:
        """h (b, d, n) in the layout its scale broadcasts against."""
        return self.layout.view(h, self.s_n)

    def _unview(self, v: Tensor) -> Tensor:
        return self.layout.unview(v, self.s_n)

    def dynamic_scale(self, h: Tensor) -> Tensor:
        """Per-write scale of h (b, d, n), rounded to float16 as stored."""
        return self.layout.dynamic_scale(self._view(h), self.qmax)

    def scale_for(self, h: Tensor) -> Tensor:
        """The scale of the viewed state: per-write or static."""
        if self.scale_mode == "dynamic":
            return self.dynamic_scale(h)
        return self.static_scale.clamp(min=EPS)

    # ---------------------------------------------------------------- quantize / dequantize
    def reseed(self):
        """Restart the stochastic-rounding stream: every pass over a sequence (and every new
        cache) draws the same noise, whatever ran before, so results reproduce after reloading."""
        self.generator = None

    def noise(self, shape, device) -> Tensor:
        """Uniform [0, 1) draws for stochastic rounding from this quantizer's seeded stream."""
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(shape, generator=self.generator, device=device)

    def _round(self, v: Tensor) -> Tensor:
        if self.rounding == "stochastic":
            return torch.floor(v + self.noise(v.shape, v.device))
        return torch.round(v)

    def quantize(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """h (b, d, n) float -> codes (b, d, n) int8 and the per-write scale (None if static)."""
        scale = self.scale_for(h)
        v = self._round(self._view(h.float()) / scale).clamp(-self.qmax, self.qmax)
        return self.layout.merge(v).to(torch.int8), (scale if self.scale_mode == "dynamic" else None)

    def dequantize(self, codes: Tensor, scale: Optional[Tensor]) -> Tensor:
        s = self.static_scale.clamp(min=EPS) if scale is None else scale.float()
        return self._unview(self.layout.split(codes.float()) * s)

    def fake_quant(self, h: Tensor) -> Tensor:
        """quantize -> dequantize, differentiable (straight-through) for reconstruction."""
        scale = self.scale_for(h)
        v = self._view(h.float()) / scale
        q = self._round(v.detach()).clamp(-self.qmax, self.qmax)
        if v.requires_grad:     # straight-through inside the range; exactly q in value
            q = q + (v - v.detach()) * (v.detach().abs() <= self.qmax)
        return self._unview(q * scale)

    def forward(self, h: Tensor) -> Tensor:
        if self.mode == "observe":
            self.observe(h)
            return h
        if self.mode == "off":
            return h
        return self.fake_quant(h)

    # ---------------------------------------------------------------- the mixer's scan and cache
    def scan(self, mixer, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, state) -> Tensor:
        """`mixer.scan` with this quantizer as its `state_quant` (see `qmamba.quant.state_scan`)."""
        return quantized_state_scan(self, mixer, x, dt, B, C, state)

    def fused_step(self, mixer, hidden: Tensor, state):
        """`mixer.step` through the fused decode kernels, or None where they do not apply (the
        mixer then runs its eager step): `qmamba.quant.fused_decode`."""
        from .fused_decode import fused_step

        return fused_step(mixer, hidden, state)

    def allocate(self, batch: int, device=None) -> QuantizedSSMState:
        self.reseed()
        return QuantizedSSMState(self, batch, device if device is not None else self.amax.device)

    # ---------------------------------------------------------------- calibration
    @torch.no_grad()
    def observe(self, h: Tensor):
        a = h.detach().abs().float()
        if self.amax.numel() == 0:
            self.amax = torch.zeros(self.d, self.n, device=a.device)
        self.amax.copy_(torch.maximum(self.amax, a.amax(0)))    # NaN and inf propagate: checked at the end
        # reservoir sample of single-sequence states for the clipping search (seeded)
        cap = max(1, min(MAX_SAMPLES, SAMPLE_BUDGET // (self.d * self.n)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._seen)
        for row in h.detach().float().cpu():
            self._seen += 1
            if len(self._samples) < cap:
                self._samples.append(row.clone())
                continue
            j = int(torch.randint(0, self._seen, (1,), generator=g))
            if j < cap:
                self._samples[j] = row.clone()

    def _static_from(self, amax: Tensor) -> Tensor:
        """Static (unclipped) scale of the viewed state from the amax map (d, n)."""
        v = self._view(amax.unsqueeze(0))[0]
        dims = tuple(d - 1 for d in self.layout.reduce_dims)
        return v.amax(dim=dims, keepdim=True) / self.qmax

    @torch.no_grad()
    def _error(self, samples: Tensor) -> float:
        """Relative squared error of fake-quantizing the samples (b, d, n) with current scales."""
        q = self.fake_quant(samples)
        return ((q - samples).pow(2).sum() / samples.pow(2).sum().clamp(min=EPS)).item()

    @torch.no_grad()
    def finish_calibration(self):
        """Static scales from the calibration maxima; for DSQ the state-axis exponent and, with
        static channel scales, the clipping factor are chosen by the error on the samples."""
        if self.amax.numel() == 0:
            raise QMambaError(f"the SSM state at {self.where or 'a layer'} was never observed or is all zero")
        if not torch.isfinite(self.amax).all():
            raise QMambaError(f"non-finite SSM state (NaN or inf) at {self.where or 'a layer'} during calibration")
        if self.amax.max() <= 0:
            raise QMambaError(f"the SSM state at {self.where or 'a layer'} was never observed or is all zero")
        samples = torch.stack(self._samples).to(self.amax.device) if self._samples else None
        amax = self.amax.clamp(min=EPS)
        self.mode = "quant"
        if self.layout.uses_s_n:
            col = amax.amax(0)                                               # (n,) max over channels
            best = None
            for alpha in DSQ_ALPHA_GRID:
                s_n = col.pow(alpha)
                self.s_n.copy_(s_n / s_n.log().mean().exp())                # geometric mean 1
                err = self._fit_static(amax, samples)
                if best is None or err < best[0]:
                    best = (err, alpha, self.s_n.clone(), self.static_scale.clone(), getattr(self, "clip", 1.0))
            _, self.dsq_alpha, s_n, static, self.clip = best
            self.s_n.copy_(s_n)
            self.static_scale.copy_(static)
        else:
            self._fit_static(amax, samples)
        self._samples, self._seen = [], 0

    def _fit_static(self, amax: Tensor, samples: Optional[Tensor]) -> float:
        """Set the static scale (clip factor from CLIP_GRID for static mode) and return the error."""
        base = self._static_from(amax)
        self.static_scale.copy_(base)
        if samples is None:
            return math.inf
        if self.scale_mode == "dynamic":
            return self._error(samples)
        best = (math.inf, 1.0)
        for clip in CLIP_GRID:
            self.static_scale.copy_(base * clip)
            best = min(best, (self._error(samples), clip))
        self.static_scale.copy_(base * best[1])
        self.clip = best[1]
        return best[0]
