"""Mamba2 mixer: SSD with one scalar A per head, B and C shared by groups of heads, and a gated
RMSNorm before out_proj.

Parameter names follow transformers' Mamba2Mixer and mamba_ssm's Mamba2. Shapes use the
glossary of `qmamba.models.scan.reference`; the state (b, h, p, n) is handled as (b, d, n), d = h * p.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LayerState
from .config import ModelConfig
from .layer_spec import LinearGroup, SmoothingPair
from .layers import GatedRMSNorm, causal_conv1d, conv_tail, float64_step, silu64, softplus64
from .mixer import MixerBase, conv_step
from .scan.ssd import ssd_scan


class Mamba2Mixer(MixerBase):
    LAYER_TYPE = "mamba2"
    LEARNABLE = {"dt_bias": "dt_bias"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, g = cfg.d_inner, cfg.d_state, cfg.ngroups
        self.d_inner, self.d_state, self.ngroups = d, n, g
        self.nheads, self.headdim, self.chunk_size = cfg.nheads, cfg.headdim, cfg.chunk_size
        self.dt_limit = cfg.dt_limit
        conv_dim = cfg.conv_dim
        self.in_proj = nn.Linear(cfg.d_model, d + conv_dim + self.nheads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(d, cfg.norm_group_size, eps=cfg.gated_norm_eps)
        self.out_proj = nn.Linear(d, cfg.d_model, bias=cfg.bias)
        self._init_quant_points()

    def ssm_state_shape(self) -> tuple[int, int]:
        return self.d_inner, self.d_state

    def linear_groups(self) -> tuple[LinearGroup, ...]:
        return LinearGroup(("in_proj",)), LinearGroup(("out_proj",))

    def smoothing_pairs(self) -> tuple[SmoothingPair, ...]:
        """in_proj from the block's RMSNorm; out_proj from the gated RMSNorm's weight (it scales
        after the per-group normalisation)."""
        return (SmoothingPair("norm.weight", ("mixer.in_proj",)),
                SmoothingPair("mixer.norm.weight", ("mixer.out_proj",)))

    @torch.no_grad()
    def init_dynamics_(self, g: torch.Generator, dt_bias: Tensor) -> None:
        """mamba_ssm's initialisation of A (uniform in [1, 16]) and the dt bias."""
        nh = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.rand(nh, generator=g) * 15 + 1))
        self.dt_bias.copy_(dt_bias)

    float64_numerics = False        # SiLU and softplus in float64 in the decode step (`float64_step`)

    def silu(self, x: Tensor) -> Tensor:
        return silu64(x) if float64_step(self, x) else F.silu(x)

    def softplus(self, x: Tensor) -> Tensor:
        return softplus64(x) if float64_step(self, x) else F.softplus(x)

    def _split(self, zxbcdt: Tensor):
        d, gn = self.d_inner, self.ngroups * self.d_state
        return zxbcdt.split([d, d + 2 * gn, self.nheads], dim=-1)           # z, xBC, dt

    def _ssm_inputs(self, xBC: Tensor, dt: Tensor):
        """xBC after conv+silu (..., conv_dim), raw dt (..., h) -> quantized x (..., d),
        dt (..., h) and B, C (..., g, n)."""
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        dt = self.softplus(dt + self.dt_bias.to(dt.dtype))
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        B = self.quant_B(B).unflatten(-1, (self.ngroups, self.d_state))
        C = self.quant_C(C).unflatten(-1, (self.ngroups, self.d_state))
        return self.quant_x(x), self.quant_dt(dt), B, C

    def _per_channel(self, t: Tensor) -> Tensor:
        """Per-head values (..., h) -> per-channel (..., d)."""
        return t.repeat_interleave(self.headdim, dim=-1)

    def parallel_scan(self, x, dt, B, C, h0):
        """x (b, l, d); dt (b, l, h); B, C (b, l, g, n) -> y (b, l, d), h (b, d, n) by chunked SSD."""
        b = x.shape[0]
        A = -torch.exp(self.A_log.float())                                  # (h,)
        h0 = None if h0 is None else h0.view(b, self.nheads, self.headdim, -1)
        y, h = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A, B, C, self.D.float(),
                        self.chunk_size, h0)
        return y.flatten(-2), h.flatten(1, 2)

    def channel_A_D(self):
        """A (d, 1) and D (d,): each head's scalar repeated over its channels."""
        return self._per_channel(-torch.exp(self.A_log.float()))[:, None], self._per_channel(self.D.float())

    def per_channel(self, x, dt, B, C):
        A, D = self.channel_A_D()
        return x, self._per_channel(dt), A, B, C, D

    def forward(self, hidden: Tensor, state: Optional[LayerState] = None) -> Tensor:
        """hidden (b, l, d_model) -> (b, l, d_model). With `state`, start from it and update it."""
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC = self.quant_conv(xBC)
        prev = None if state is None else self.conv_read(state, xBC.dtype)
        if state is not None:
            self.conv_write(state, conv_tail(xBC, self.conv1d.weight.shape[-1], prev))
        xBC = self.silu(causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, prev))
        x, dt, B, C = self._ssm_inputs(xBC, dt)                             # B, C (b, l, g, n)
        y = self.scan(x, dt, B, C, state)                                   # (b, l, d)
        y = self.norm(y.to(hidden.dtype), self.quant_z(z))
        return self.out_proj(y)

    def step(self, hidden: Tensor, state: LayerState) -> Tensor:
        """One token through the recurrent cache. hidden (b, d_model) -> (b, d_model). A state
        quantizer may run the whole step itself (fused kernels, same numbers; None: not here)."""
        fused = getattr(self.state_quant, "fused_step", None)
        out = None if fused is None else fused(self, hidden, state)
        if out is not None:
            return out
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC, tail = conv_step(self.conv_read(state, xBC.dtype), self.quant_conv(xBC), self.conv1d.weight, self.conv1d.bias)
        self.conv_write(state, tail)
        x, dt, B, C = self._ssm_inputs(self.silu(xBC), dt)                 # B, C (b, g, n)
        A, D = self.decode_constants()                                      # (d, 1), (d,)
        x32 = x.float()
        y = state.ssm.step(x32, self._per_channel(dt.float()), A, B.float(), C.float())
        y = y + D * x32                                                     # (b, d)
        return self.out_proj(self.norm(y.to(hidden.dtype), self.quant_z(z)))
