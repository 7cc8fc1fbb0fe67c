"""Mamba (Mamba1) mixer: selective SSM with per-channel A (d, n) and per-token B, C, dt.

Parameter names follow transformers' MambaMixer and mamba_ssm's Mamba, so checkpoints of both
load without renaming. Shapes use the glossary of `qmamba.models.scan.reference` (here g = 1).
Falcon-Mamba is this mixer plus a weight-less RMS norm of B, C and dt (`mixer_rms_eps`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LayerState
from .config import ModelConfig
from .layer_spec import LinearGroup, SmoothingPair
from .layers import causal_conv1d, conv_tail, rms
from .mixer import MixerBase, conv_step
from .scan.mamba1 import chunk_end_states, selective_scan


class Mamba1Mixer(MixerBase):
    LAYER_TYPE = "mamba1"
    LEARNABLE = {"dt_bias": "dt_proj.bias"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.rms_eps = cfg.mixer_rms_eps
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d, d, cfg.d_conv, groups=d, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.d_model, bias=cfg.bias)
        self._init_quant_points()

    def ssm_state_shape(self) -> tuple[int, int]:
        return self.d_inner, self.d_state

    def linear_groups(self) -> tuple[LinearGroup, ...]:
        # x_proj reads the scan input x, already quantized by quant_x
        return (LinearGroup(("in_proj",)), LinearGroup(("x_proj",), input_quantized=True),
                LinearGroup(("dt_proj",)), LinearGroup(("out_proj",)))

    def smoothing_pairs(self) -> tuple[SmoothingPair, ...]:
        """in_proj from the block's RMSNorm; dt_proj from the dt rows of x_proj, except in
        Falcon-Mamba (a weight-less RMS norm of dt sits between them). x_proj's input (also the
        scan input) and out_proj's (y * silu(z)) have no exactly foldable producer."""
        pairs = (SmoothingPair("norm.weight", ("mixer.in_proj",)),)
        if self.rms_eps is None:
            pairs += (SmoothingPair("mixer.x_proj.weight", ("mixer.dt_proj",), rows=(0, self.dt_rank)),)
        return pairs

    @torch.no_grad()
    def init_dynamics_(self, g: torch.Generator, dt_bias: Tensor) -> None:
        """mamba_ssm's initialisation of A (S4D-real), the dt bias and dt_proj's weight."""
        nh = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(nh, -1))
        self.dt_proj.bias.copy_(dt_bias)
        std = self.dt_rank ** -0.5
        self.dt_proj.weight.copy_((torch.rand(self.dt_proj.weight.shape, generator=g) * 2 - 1) * std)

    def _ssm_inputs(self, x: Tensor):
        """x after conv+silu (..., d) -> quantized x, dt, B, C with B, C (..., n)."""
        x = self.quant_x(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.rms_eps is not None:
            dt, B, C = (rms(t, self.rms_eps).to(x.dtype) for t in (dt, B, C))
        dt = self.quant_dt(F.softplus(self.dt_proj(dt)))
        return x, dt, self.quant_B(B), self.quant_C(C)

    def channel_A_D(self):
        return -torch.exp(self.A_log.float()), self.D.float()               # (d, n), (d,)

    def parallel_scan(self, x, dt, B, C, h0):
        """x, dt (b, l, d); B, C (b, l, n) -> y (b, l, d), h (b, d, n)."""
        A, D = self.channel_A_D()
        return selective_scan(x, dt, A, B.unsqueeze(2), C.unsqueeze(2), D, h0)

    def end_states(self, x, dt, B, C):
        """x, dt (b, l, d); B (b, l, n) -> h_l (b, d, n) from zero, without the read-out."""
        return chunk_end_states(x, dt, self.channel_A_D()[0], B.unsqueeze(2))

    def per_channel(self, x, dt, B, C):
        A, D = self.channel_A_D()
        return x, dt, A, B.unsqueeze(2), C.unsqueeze(2), D

    def forward(self, hidden: Tensor, state: Optional[LayerState] = None) -> Tensor:
        """hidden (b, l, d_model) -> (b, l, d_model). With `state`, start from it and update it."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                        # (b, l, d) each
        x = self.quant_conv(x)
        prev = None if state is None else self.conv_read(state, x.dtype)
        if state is not None:
            self.conv_write(state, conv_tail(x, self.conv1d.weight.shape[-1], prev))
        x = F.silu(causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, prev))
        x, dt, B, C = self._ssm_inputs(x)                                   # B, C (b, l, n)
        y = self.scan(x, dt, B, C, state)                                   # (b, l, d)
        y = y.to(hidden.dtype) * F.silu(self.quant_z(z))                    # (b, l, d)
        return self.out_proj(y)

    def step(self, hidden: Tensor, state: LayerState) -> Tensor:
        """One token through the recurrent cache. hidden (b, d_model) -> (b, d_model)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                        # (b, d)
        x, tail = conv_step(self.conv_read(state, x.dtype), self.quant_conv(x), self.conv1d.weight, self.conv1d.bias)
        self.conv_write(state, tail)
        x, dt, B, C = self._ssm_inputs(F.silu(x))                           # B, C (b, n)
        A, D = self.decode_constants()                                      # (d, n), (d,)
        y = state.ssm.step(x.float(), dt.float(), A, B.float().unsqueeze(1), C.float().unsqueeze(1))
        y = y + D * x.float()                                               # (b, d)
        return self.out_proj(y.to(hidden.dtype) * F.silu(self.quant_z(z)))
