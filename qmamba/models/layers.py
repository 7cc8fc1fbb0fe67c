"""Small building blocks shared by both mixers: RMS norms and the causal depthwise conv.

Shapes use the letters of `qmamba.models.scan.reference`: b batch, l time, d channels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms(x: Tensor, eps: float) -> Tensor:
    """Weight-less RMS normalisation over the last dim, computed in float32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


# Float64 numerics. A float32 norm or SiLU depends on the order of a reduction and on the exp
# of the library that runs it (PyTorch's vectorised one differs between CPU capabilities and from
# C's libm). Computed in float64 and rounded once to float32, any two correct implementations
# agree unless a value lies within about 2^-52 (relative) of a float32 rounding boundary: the
# decode step of a quantized model in integer execution uses these (`float64_numerics`, for
# one-token inputs (b, d) only; prompts (b, l, d) keep float32), so that the native decode step
# (qmamba.kernels, mamba2_model_step) reproduces the eager step bit for bit.
def float64_step(module: nn.Module, x: Tensor) -> bool:
    """Whether `module` computes x in float64: its `float64_numerics` is on and x is one token
    per sequence (b, d), the decode step."""
    return module.float64_numerics and x.dim() == 2


def rms64(x: Tensor, eps: float) -> Tensor:
    """`rms` in float64: x * (sum(x^2) / k + eps)^-1/2, rounded once to float32."""
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps)).float()


def silu64(x: Tensor) -> Tensor:
    """SiLU in float64, rounded once to x's dtype."""
    return F.silu(x.double()).to(x.dtype)


def softplus64(x: Tensor) -> Tensor:
    """softplus (threshold 20) in float64, rounded once to x's dtype."""
    return F.softplus(x.double()).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as transformers' MambaRMSNorm: normalise in float32, cast back, then scale."""

    float64_numerics = False        # `rms64` in the decode step (see `float64_step`)

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (rms64 if float64_step(self, x) else rms)(x, self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's norm: y * silu(z), then RMSNorm over each group of `group_size` channels on its
    own. mamba_ssm's RMSNormGated (norm_before_gate=False) uses group_size = d / ngroups, and so
    does transformers from 5.23; older transformers normalised over all d channels (hf_compat)."""

    float64_numerics = False        # the gate and the norm in float64 in the decode step (`float64_step`)

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        wide = float64_step(self, y)
        acc = torch.float64 if wide else torch.float32
        y = y.to(acc) * F.silu(z.to(acc))                                   # (b, l, d) or (b, d)
        shape = y.shape
        y = (rms64 if wide else rms)(y.reshape(*shape[:-1], -1, self.group_size), self.eps)
        return self.weight * y.reshape(shape).to(dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], prev: Optional[Tensor] = None) -> Tensor:
    """Depthwise causal conv over time. x (b, l, d); weight (d, 1, w); prev (b, d, w-1) holds the
    inputs before x (zeros when None). Returns (b, l, d) in x's dtype."""
    w = weight.shape[-1]
    xt = x.transpose(1, 2)                                                  # (b, d, l)
    xt = F.pad(xt, (w - 1, 0)) if prev is None else torch.cat([prev.to(xt.dtype), xt], dim=-1)
    return F.conv1d(xt, weight.to(xt.dtype), None if bias is None else bias.to(xt.dtype),
                    groups=xt.shape[1]).transpose(1, 2)


def conv_tail(x: Tensor, w: int, prev: Optional[Tensor] = None) -> Tensor:
    """The last w-1 inputs of the conv after x, i.e. the conv state to keep. x (b, l, d) -> (b, d, w-1)."""
    xt = x.transpose(1, 2)
    if prev is not None:
        xt = torch.cat([prev.to(xt.dtype), xt], dim=-1)
    if xt.shape[-1] < w - 1:
        xt = F.pad(xt, (w - 1 - xt.shape[-1], 0))
    return xt[..., xt.shape[-1] - (w - 1):].contiguous()
