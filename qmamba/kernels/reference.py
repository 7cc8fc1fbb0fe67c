"""The pure-PyTorch twins of the C kernels: the same arithmetic, operation by operation, so a
kernel and its twin agree bit for bit (tests/kernels/test_kernel_registry.py pairs every registered
kernel with its twin). Slow, for tests and for reading: the integer sums are int64 matmuls, the
8-lane float accumulations of the C code are kept as 8 lanes here and summed in its order, and a
fused multiply-add (`fma_f32`) is computed exactly in float64.

The one thing PyTorch cannot reproduce is the C library's scalar `expf`, which the kernels use
for exp of fewer than 8 values (the tail of a row, per-head decays): the twins take that scalar
exp as an argument (`scalar_exp`, default torch.exp, which may differ in the last bit).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

ScalarExp = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------- code packing
def pack_codes(q: Tensor, per_byte: int) -> Tensor:
    """Signed codes (int8) as the state cache stores them: 1 per byte (int8), 2 per byte (element
    2i in the low nibble) or 4 per byte (element 4i + j in bits 2j, 2j + 1), the last dim padded
    with zero codes to a multiple of `per_byte`."""
    if per_byte == 1:
        return q
    if q.shape[-1] % per_byte:
        q = torch.cat([q, q.new_zeros(q.shape[:-1] + (per_byte - q.shape[-1] % per_byte,))], dim=-1)
    bits = 8 // per_byte
    u = (q.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    out = u[..., 0::per_byte]
    for j in range(1, per_byte):
        out = out | (u[..., j::per_byte] << (bits * j))
    return out


def unpack_codes(p: Tensor, per_byte: int, size: Optional[int] = None) -> Tensor:
    """Inverse of `pack_codes`; `size` drops the padding codes."""
    if per_byte == 1:
        q = p
    else:
        bits = 8 // per_byte
        parts = [((p >> (bits * j)) & ((1 << bits) - 1)).to(torch.int8) for j in range(per_byte)]
        half = 1 << (bits - 1)
        q = torch.stack([torch.where(v >= half, v - (1 << bits), v) for v in parts], dim=-1).flatten(-2)
    return q if size is None else q[..., :size]


# --------------------------------------------------------------------------- float helpers
def fma_f32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a * b + c with one rounding to float32, as vfmadd and fmaf compute it: the product is exact
    in float64, the sum is rounded to odd in float64 (TwoSum gives its exact error) and then to
    nearest float32, which is the correctly rounded result (53 >= 2 * 24 + 2 bits)."""
    p = a.double() * b.double()
    cd = c.double().expand_as(p)
    s = p + cd
    bb = s - p
    err = (p - (s - bb)) + (cd - bb)
    even = (s.view(torch.int64) & 1) == 0
    towards = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even, torch.nextafter(s, towards), s)
    return s.float()


def max_ps(a: Tensor, b: Tensor) -> Tensor:
    """vmaxps: a > b ? a : b (b when either is NaN)."""
    return torch.where(a > b, a, b)


def min_ps(a: Tensor, b: Tensor) -> Tensor:
    """vminps: a < b ? a : b."""
    return torch.where(a < b, a, b)


def hsum8(v: Tensor) -> Tensor:
    """The kernels' horizontal sum of 8 float lanes (last dim): ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))."""
    s = v[..., :4] + v[..., 4:]
    return (s[..., 0] + s[..., 2]) + (s[..., 1] + s[..., 3])


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float32)


_EXP_CONST = [_f32(v) for v in (1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2,
                                1.6666665459E-1, 5.0000001201E-1)]


def exp8(x: Tensor) -> Tensor:
    """The kernels' vectorised exp (Cephes' expf), lane by lane."""
    x = min_ps(max_ps(x, _f32(-87.3365447505531)), _f32(88.3762626647949))
    m = torch.floor(fma_f32(x, _f32(1.44269504088896341), _f32(0.5)))
    x = fma_f32(-m, _f32(0.693359375), x)
    x = fma_f32(-m, _f32(-2.12194440e-4), x)
    y = _EXP_CONST[0].expand_as(x)
    for c in _EXP_CONST[1:]:
        y = fma_f32(y, x, c)
    y = fma_f32(y, x * x, x + 1.0)
    return y * ((m.to(torch.int32) + 127) << 23).view(torch.float32)


def exp_rows(x: Tensor, scalar_exp: ScalarExp = torch.exp) -> Tensor:
    """exp along the last dim as the kernels compute it: `exp8` on each full block of 8, the
    scalar exp on the rest."""
    full = x.shape[-1] // 8 * 8
    return torch.cat([exp8(x[..., :full]), scalar_exp(x[..., full:])], dim=-1)


# --------------------------------------------------------------------------------- the twins
def i8_linear(q_x: Tensor, s_x: Tensor, codes: Tensor, w_scale: Tensor, group_size: int,
              bias: Optional[Tensor]) -> Tensor:
    """Twin of the C i8_linear: q_x (M, K) int8, s_x (M,), codes (N, K) int8, w_scale (N, G) ->
    (M, N) float32 = s_x * sum_g w_scale[:, g] * (exact integer sum of group g) + bias."""
    m, k = q_x.shape
    n = codes.shape[0]
    gs = group_size or k
    sw = w_scale.float().reshape(n, k // gs)
    y = torch.zeros(m, n)
    for g in range(k // gs):
        t = q_x[:, g * gs:(g + 1) * gs].long() @ codes[:, g * gs:(g + 1) * gs].long().t()     # (M, N) exact
        y = y + sw[:, g] * t.float()
    return s_x.float().expand(m).reshape(m, 1) * y + (0.0 if bias is None else bias.float())


def quantize_rows(x: Tensor, static_scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """The kernels' int8 activations: (M, K) float -> codes (M, K) int8, scales (M,)."""
    x = x.float()
    if static_scale is None:
        s = x.abs().amax(1).clamp(min=1e-12) / 127
    else:
        s = _f32(static_scale).expand(x.shape[0])
    return torch.round(x / s[:, None]).clamp(-127, 127).to(torch.int8), s


def i8_linear_quantizing(x: Tensor, static_scale: Optional[float], codes: Tensor, w_scale: Tensor,
                         group_size: int, bias: Optional[Tensor]) -> Tensor:
    """Twin of the C i8_linear_f32: `i8_linear` of float activations quantized per row."""
    q_x, s_x = quantize_rows(x, static_scale)
    return i8_linear(q_x, s_x, codes, w_scale, group_size, bias)


def f32i8_linear(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """Twin of the C f32i8_linear: x (M, K) float32, codes (N, K) int8, scale (N,) -> (M, N).
    Blocks of four rows: 8 lanes of fused multiply-adds, their horizontal sum, then the last
    K % 8 columns one by one; the last N % 4 rows: one sequential sum."""
    x = x.float()
    m, k = x.shape
    n = codes.shape[0]
    w = codes.float()
    n4, k8 = n // 4 * 4, k // 8 * 8
    lanes = torch.zeros(m, n4, 8)
    for k0 in range(0, k8, 8):
        lanes = fma_f32(x[:, None, k0:k0 + 8], w[None, :n4, k0:k0 + 8], lanes)
    y = hsum8(lanes)
    for j in range(k8, k):
        y = y + x[:, j:j + 1] * w[None, :n4, j]
    tail = torch.zeros(m, n - n4)
    for j in range(k):
        tail = tail + x[:, j:j + 1] * w[None, n4:, j]
    return scale.float().reshape(n) * torch.cat([y, tail], dim=1)


def exp_f32(x: Tensor, scalar_exp: ScalarExp = torch.exp) -> Tensor:
    """Twin of the C exp_f32 over a flat tensor: `exp8` on full blocks of 8, the scalar exp after."""
    return exp_rows(x.float().reshape(-1), scalar_exp).reshape(x.shape)


def dsq_scan(codes: Tensor, scales: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             s_n: Tensor, static_scale: Tensor, dynamic: bool, per_byte: int, qmax: float,
             scalar_exp: ScalarExp = torch.exp) -> Tensor:
    """Twin of the C dsq_scan (arguments as `NativeKernels.dsq_scan`; codes and scales updated in
    place). Rows whose n is a multiple of 16 take the kernel's 8-lane order for the state's
    maximum and the read-out sum, others its sequential order."""
    b, length, d = x.shape
    g, n = B.shape[-2:]
    x, dt, A, B, C, s_n = (t.float() for t in (x, dt, A, B, C, s_n))
    vec = n % 16 == 0
    s = scales.float().reshape(b, d, 1) if dynamic else static_scale.float().reshape(1, d, 1).expand(b, d, 1)
    h = (unpack_codes(codes, per_byte, n).float() * s) * s_n                  # (b, d, n)
    q, ys = None, []
    for t in range(length):
        dtc, dtx = dt[:, t, :, None], (dt[:, t] * x[:, t])[..., None]         # (b, d, 1)
        dA = exp_rows(dtc * A, scalar_exp)                                     # (b, d, nA)
        Bt, Ct = (v[:, t].repeat_interleave(d // g, dim=1) for v in (B, C))    # (b, d, n)
        h = dA * h + dtx * Bt
        v = (h / s_n).abs()
        if vec:
            lanes = torch.zeros(b, d, 8)
            for k0 in range(0, n, 8):
                lanes = max_ps(lanes, v[..., k0:k0 + 8])
            parts = lanes
        else:
            parts = v
        amax = torch.zeros(b, d)
        for j in range(parts.shape[-1]):
            amax = torch.where(parts[..., j] > amax, parts[..., j], amax)
        if dynamic:
            sc = amax / _f32(qmax)
            sc = torch.where(sc < 2.0 ** -24, _f32(2.0 ** -24), torch.where(sc > 65504.0, _f32(65504.0), sc))
            s = sc.half().float()[..., None]
        v = torch.round((h / s_n) / s)
        if vec:
            v = min_ps(max_ps(v, _f32(-qmax)), _f32(qmax))
        else:
            v = torch.where(v < -qmax, _f32(-qmax), torch.where(v > qmax, _f32(qmax), v))
        q = v
        h = (v * s) * s_n
        prod = h * Ct
        if vec:
            lanes = torch.zeros(b, d, 8)
            for k0 in range(0, n, 8):
                lanes = lanes + prod[..., k0:k0 + 8]
            acc = hsum8(lanes)
        else:
            acc = torch.zeros(b, d)
            for k in range(n):
                acc = acc + prod[..., k]
        ys.append(acc)
    if length:
        if dynamic:
            scales.copy_(s.reshape(scales.shape).to(scales.dtype))
        codes.copy_(pack_codes(q.to(torch.int8), per_byte).view(codes.dtype))
    return torch.stack(ys, dim=1) if ys else torch.zeros(b, 0, d)


# ------------------------------------------------------------------- Mamba2 decode step pieces
def _fq8(x: Tensor, s: float) -> Tensor:
    """Static symmetric 8-bit fake quantization, as `qmamba.quant.primitives.fake_quant`."""
    s = _f32(s)
    return torch.round(x.float() / s).clamp(-127, 127) * s


def mamba2_conv_step(xbc: Tensor, scale: float, state: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Twin of the C mamba2_conv_step (arguments as `NativeKernels.mamba2_conv_step`; the int8
    conv state updated in place): the eager step's quant_conv, conv_read, conv_step and
    conv_write (qmamba/models/mixer.py)."""
    s = _f32(scale)
    window = torch.cat([state.float() * s, _fq8(xbc, scale).unsqueeze(-1)], dim=-1)    # (b, cd, w)
    out = (window * weight[:, 0, :].float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    state.copy_(torch.round(window[..., 1:].float() / s).clamp(-127, 127).to(torch.int8))
    return out


def mamba2_ssm_step(xbc: Tensor, dt: Tensor, z: Tensor, act_scales: tuple, A: Tensor, D: Tensor,
                    codes: Tensor, scales: Tensor, s_n: Tensor, static_scale: Tensor, dynamic: bool,
                    per_byte: int, qmax: float, headdim: int, ngroups: int,
                    scalar_exp: ScalarExp = torch.exp) -> tuple[Tensor, Tensor]:
    """Twin of the C mamba2_ssm_step (arguments as `NativeKernels.mamba2_ssm_step`; codes and
    scales updated in place): the eager step's quantizers of x, B, C, dt and z, one token of
    `dsq_scan` and D x (qmamba/models/mamba2.py `step`)."""
    sx, sB, sC, sdt, sz = act_scales
    b, d = z.shape
    gn = (xbc.shape[-1] - d) // 2
    x, B, C = xbc.float().split([d, gn, gn], dim=-1)
    x, B, C = _fq8(x, sx), _fq8(B, sB).unflatten(-1, (ngroups, -1)), _fq8(C, sC).unflatten(-1, (ngroups, -1))
    dtc = _fq8(dt, sdt).repeat_interleave(headdim, dim=-1)
    y = dsq_scan(codes, scales, x[:, None], dtc[:, None], A, B[:, None], C[:, None], s_n, static_scale, dynamic,
                 per_byte, qmax, scalar_exp)[:, 0]
    return y + D.float() * x, _fq8(z, sz)


# ------------------------------------------------------------------- Mamba2 model step, whole
def mamba2_model_step(layers: list, hidden: Tensor, scalar_exp: ScalarExp = torch.exp) -> Tensor:
    """Twin of the C mamba2_model_step (arguments as `NativeKernels.mamba2_model_step`: a
    `Mamba2Layer` per block; hidden, the conv states, codes and scales updated in place): per
    layer the block's RMSNorm, in_proj, the conv step, SiLU, softplus, the SSM step, the gated
    RMSNorm, out_proj and the residual add, the norms and activations in float64
    (`qmamba.models.layers.rms64`)."""
    from ..models.layers import rms64, silu64, softplus64

    for L in layers:
        u = L.norm_w * rms64(hidden, L.norm_eps)
        zx = i8_linear_quantizing(u, None if L.in_dynamic else L.in_sx, L.in_w, L.in_sw, L.in_gs, L.in_bias)
        z, xbc, dt = zx.split([L.d, L.d + 2 * L.g * L.n, L.d // L.headdim], dim=-1)
        xbc = silu64(mamba2_conv_step(xbc, L.s_conv, L.conv_state, L.conv_w[:, None], L.conv_b))
        dt = softplus64(dt + L.dt_bias).clamp(L.dt_lo, L.dt_hi)
        y, zq = mamba2_ssm_step(xbc, dt, z, (L.sx, L.sB, L.sC, L.sdt, L.sz), L.A, L.Dskip, L.codes, L.scales, L.s_n,
                                L.s_c, L.dynamic, L.per_byte, L.qmax, L.headdim, L.g, scalar_exp)
        gated = (y.double() * silu64(zq.double())).unflatten(-1, (-1, L.group_size))
        y = L.gnorm_w * rms64(gated, L.gnorm_eps).flatten(-2)
        hidden.copy_(hidden + i8_linear_quantizing(y, None if L.out_dynamic else L.out_sx, L.out_w, L.out_sw,
                                                   L.out_gs, L.out_bias))
    return hidden
