"""Uniform quantization primitives: integer ranges, scales, rounding (nearest with a
straight-through gradient, or stochastic), quantize / dequantize / fake-quantize, and 4-bit packing.

Conventions (as in torchao's affine primitives):
    q = clamp(round(x / scale) + zero, qmin, qmax)        x_hat = (q - zero) * scale
Symmetric quantization has zero = 0 and the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1]
(int8: -127..127, int4: -7..7), so that -x quantizes to -q. Asymmetric has [0, 2^b - 1].
Scales broadcast against x: a scalar is per-tensor, (d, 1) per output channel, (b, l, 1) per token,
(d, n / gs, 1) group-wise after `to_groups`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

EPS = 1e-12   # the smallest scale; keeps all-zero tensors quantizable


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    if not 1 < bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def storage_dtype(bits: int, symmetric: bool = True) -> torch.dtype:
    """The integer dtype that holds one code (before packing)."""
    if bits <= 8:
        return torch.int8 if symmetric else torch.uint8
    return torch.int16 if symmetric else torch.int32


def round_ste(x: Tensor) -> Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    if not x.requires_grad:              # the same value (x + (round(x) - x) is exact), 3 ops fewer
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def round_stochastic(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """floor(x + U[0, 1)): unbiased rounding, E[round(x)] = x; straight-through gradient."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (torch.floor(x + noise) - x).detach()


def symmetric_scale(absmax: Tensor, bits: int) -> Tensor:
    """Scale that maps +-absmax to +-qmax."""
    return absmax.clamp(min=EPS) / qrange(bits, True)[1]


def asymmetric_params(xmin: Tensor, xmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map [min(xmin, 0), max(xmax, 0)] onto [0, 2^b - 1]."""
    qmin, qmax = qrange(bits, False)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = ((xmax - xmin) / (qmax - qmin)).clamp(min=EPS)
    zero = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, bits: int, zero: Optional[Tensor] = None,
             stochastic: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """Integer codes of x (in the storage dtype of `bits`)."""
    symmetric = zero is None
    qmin, qmax = qrange(bits, symmetric)
    v = x / scale
    v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)) \
        if stochastic else torch.round(v)
    if zero is not None:
        v = v + zero
    return v.clamp(qmin, qmax).to(storage_dtype(bits, symmetric))


def dequantize(q: Tensor, scale: Tensor, zero: Optional[Tensor] = None, dtype=torch.float32) -> Tensor:
    v = q.to(dtype)
    if zero is not None:
        v = v - zero.to(dtype)
    return v * scale.to(dtype)


def fake_quant(x: Tensor, scale: Tensor, bits: int, zero: Optional[Tensor] = None,
               stochastic: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """quantize -> dequantize in floating point, differentiable: straight-through for x inside
    the range, and the LSQ-style gradient for `scale` (the rounding residual)."""
    symmetric = zero is None
    qmin, qmax = qrange(bits, symmetric)
    v = x / scale
    v = round_stochastic(v, generator) if stochastic else round_ste(v)
    if zero is not None:
        v = v + zero
    v = v.clamp(qmin, qmax)
    if zero is not None:
        v = v - zero
    return v * scale


# ------------------------------------------------------------------ granularities

def to_groups(x: Tensor, group_size: int) -> Tensor:
    """(..., m) -> (..., m / gs, gs): the last dim split into groups of `group_size`."""
    if x.shape[-1] % group_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group size {group_size}")
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def dequantize_weight(q: Tensor, scale: Tensor, group_size: int, dtype=torch.float32) -> Tensor:
    """Weight codes (out, in) times their scales: (out, 1) per channel, or (out, in / gs, 1) per
    group of `group_size` input columns. Returns (out, in) in `dtype`."""
    if group_size:
        return (to_groups(q.to(dtype), group_size) * scale.to(dtype)).flatten(-2)
    return q.to(dtype) * scale.to(dtype)


def absmax(x: Tensor, dims) -> Tensor:
    """max |x| over `dims`, kept as size-1 dims so the result broadcasts against x."""
    return x.abs().amax(dim=dims, keepdim=True)


# ------------------------------------------------------------------ 4-bit and 2-bit packing

def pack_int4(q: Tensor) -> Tensor:
    """Signed 4-bit codes (int8 in -8..7), last dim even -> uint8, two codes per byte
    (element 2i in the low nibble, 2i+1 in the high nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 (..., m/2) -> int8 (..., m) in -8..7."""
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_int2(q: Tensor) -> Tensor:
    """Signed 2-bit codes (int8 in -2..1), last dim a multiple of 4 -> uint8, four codes per
    byte (element 4i + j in bits 2j..2j+1)."""
    if q.shape[-1] % 4:
        raise ValueError(f"pack_int2 needs a last dim divisible by 4, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0x3).to(torch.uint8)
    return u[..., 0::4] | (u[..., 1::4] << 2) | (u[..., 2::4] << 4) | (u[..., 3::4] << 6)


def unpack_int2(p: Tensor) -> Tensor:
    """Inverse of `pack_int2`: uint8 (..., m/4) -> int8 (..., m) in -2..1."""
    parts = [((p >> (2 * j)) & 0x3).to(torch.int8) for j in range(4)]
    return torch.stack([torch.where(v > 1, v - 4, v) for v in parts], dim=-1).flatten(-2)


def codes_per_byte(bits: int, dense: bool = False) -> int:
    """How many codes one stored byte holds: 1 above 4 bits, 2 for 3..4 bits and, for `dense`
    storage (the state cache), 4 for 2 bits; weights keep two per byte at 2 bits."""
    if bits > 4:
        return 1
    return 4 if dense and bits <= 2 else 2


def pack_codes(q: Tensor, per_byte: int) -> Tensor:
    """Codes as stored, `per_byte` (1, 2 or 4) to a byte, the last dim padded with zero codes to
    a multiple of it; one per byte means int8 as they are."""
    if per_byte == 1:
        return q
    if q.shape[-1] % per_byte:
        q = torch.cat([q, q.new_zeros(q.shape[:-1] + (per_byte - q.shape[-1] % per_byte,))], dim=-1)
    return pack_int4(q) if per_byte == 2 else pack_int2(q)


def unpack_codes(p: Tensor, per_byte: int, size: Optional[int] = None) -> Tensor:
    """Inverse of `pack_codes`; `size` drops the padding codes."""
    q = p if per_byte == 1 else (unpack_int4(p) if per_byte == 2 else unpack_int2(p))
    return q if size is None else q[..., :size]


def pack(q: Tensor, bits: int) -> Tensor:
    """Weight codes as stored: `codes_per_byte(bits)` to a byte."""
    return pack_codes(q, codes_per_byte(bits))


def unpack(p: Tensor, bits: int, size: Optional[int] = None) -> Tensor:
    """Inverse of `pack`; `size` drops the padding code of an odd last dim."""
    return unpack_codes(p, codes_per_byte(bits), size)
