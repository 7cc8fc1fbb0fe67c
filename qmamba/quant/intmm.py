"""Integer execution of quantized linears: int8 activations x int8 weights -> int32, scales after.

    y = (s_x * s_w) * (q_x @ q_w^T) + bias       q_x = round(x / s_x) in [-127, 127] (int8)

Two backends compute the int32 products exactly: on a CPU, the small C kernel that the registry of
`qmamba.kernels` picks for it (it reads the int8 weights once per call, the decode bottleneck);
elsewhere `torch._int_mm` (CUDA, and CPU through oneDNN, which is slow without VNNI/AMX). W4
weights are unpacked to int8 per call; group-wise weights get one scale per group and product.
Weight-only layers (W4A16/W8A16 linears, an untied 8-bit lm_head) read int8 weights with float
activations through the C kernel when it is there, and dequantize otherwise. The simulated path
of `QLinear.forward` computes the same sums in float32 from dequantized operands, so the two
agree up to float rounding (tests/quant/test_intmm.py).

`qmamba.quant.execution.set_execution(model, "int")` switches a model's linears and its 8-bit
lm_head onto these paths; "sim" switches back. `backend()` names what a CPU tensor will run on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import lookup as kernel_lookup
from .activation import ActQuantizer
from .primitives import dequantize_weight

WEIGHT_ONLY_KERNEL_MAX_ROWS = 64    # above this (a prompt), dequantize + float GEMM is faster


def _kernel(x: Tensor, op: str = "i8_linear_quantizing"):
    """The registry's kernel for `op` on x's device, or None: torch's path (tests force that
    with `qmamba.kernels.forced("torch")`)."""
    return kernel_lookup(op, x.device.type)


def backend(device: str = "cpu") -> str:
    """What the int8 x int8 products of a tensor on `device` run on."""
    k = _kernel(torch.empty(0, device=device))
    return f"{k.impl} C kernel (qmamba.kernels)" if k is not None else "torch._int_mm"


def _split_input_quant(iq: nn.Module):
    """(pre, ActQuantizer): Quamba wraps its quantizer after a rotation."""
    if isinstance(iq, ActQuantizer):
        return None, iq
    if isinstance(iq, nn.Sequential) and isinstance(iq[-1], ActQuantizer):
        return iq[:-1], iq[-1]
    return None, None


def supports_int(lin: nn.Module) -> bool:
    """Whether a QLinear can run on integer products: integer weights with an 8-bit input
    quantizer, or with no input quantizer at all."""
    pre, aq = _split_input_quant(lin.input_quant)
    if lin.w_bits is None:
        return False
    if aq is None:
        return pre is None and isinstance(lin.input_quant, nn.Identity)
    return aq.bits == 8 and aq.mode == "quant"


# int32 sums over at most this many columns cannot overflow: |codes| <= 127 (activations are
# clamped there, weight codes checked at load), 127 * 127 * 131072 = 2,114,060,288 < 2**31 - 1
INT32_SAFE_K = 131072


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """(m, k) int8 @ (k, n) int8 -> (m, n) integer sums, exact for any k: int32 (torch._int_mm) up
    to INT32_SAFE_K columns, above that int64 sums of int32 chunks. Pads m to 17 rows on CUDA
    (its minimum)."""
    m, k = a.shape
    if k > INT32_SAFE_K:
        return sum(int_mm(a[:, i:i + INT32_SAFE_K].contiguous(), b[i:i + INT32_SAFE_K]).long()
                   for i in range(0, k, INT32_SAFE_K))
    if a.is_cuda and m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
    return torch._int_mm(a, b)[:m]


def weight_only(x: Tensor, codes: Tensor, scale: Tensor, group_size: int = 0,
                bias: Tensor | None = None) -> Tensor:
    """x (m, k) float32 @ dequant(codes (n, k) int8, scale)^T -> (m, n) float32, without a float
    copy of the whole weight: the C kernel for a few rows, else dequantized blocks of rows."""
    kernel = None if group_size or x.shape[0] > WEIGHT_ONLY_KERNEL_MAX_ROWS else _kernel(x, "f32i8_linear")
    if kernel is not None:
        y = kernel(x, codes, scale)
    else:
        y = blockwise_linear(x, codes, scale, group_size)
    return y if bias is None else y + bias.float()


def blockwise_linear(x: Tensor, codes: Tensor, scale: Tensor, group_size: int = 0,
                     block: int = 8192) -> Tensor:
    """x (m, k) @ dequant(codes, scale)^T, dequantizing `block` output rows at a time."""
    if codes.shape[0] <= block:
        return F.linear(x, dequantize_weight(codes, scale, group_size, x.dtype))
    return torch.cat([F.linear(x, dequantize_weight(codes[i:i + block], scale[i:i + block], group_size, x.dtype))
                      for i in range(0, codes.shape[0], block)], dim=-1)


def linear_int(lin: nn.Module, x: Tensor) -> Tensor:
    """`lin(x)` of a QLinear through integer products. x (..., k) float -> (..., n) in x's dtype."""
    pre, aq = _split_input_quant(lin.input_quant)
    if pre is not None:
        x = pre(x)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()                                   # (m, k)
    codes = lin.codes()                                                     # (n, k) int8
    if aq is None:                                                          # weight-only
        y = weight_only(x2, codes, lin.w_scale, lin.group_size, lin.bias)
        return y.reshape(*shape[:-1], -1).to(x.dtype)
    kernel = _kernel(x2)
    if kernel is not None:                # the kernel quantizes the rows itself (same rounding)
        static = None if aq.dynamic else float(aq.scale)
        y = kernel(x2, static, codes, lin.w_scale, lin.group_size, lin.bias)
        return y.reshape(*shape[:-1], -1).to(x.dtype)
    s_x = aq.current_scale(x2).float()                                      # () or (m, 1)
    q_x = torch.round(x2 / s_x).clamp(-127, 127).to(torch.int8)
    if lin.group_size:
        gs = lin.group_size
        if codes.shape[1] % gs:             # QLinear refuses it; never drop the last columns
            raise ValueError(f"group size {gs} does not divide the {codes.shape[1]} input features")
        y = 0
        for g in range(codes.shape[1] // gs):
            acc = int_mm(q_x[:, g * gs:(g + 1) * gs].contiguous(), codes[:, g * gs:(g + 1) * gs].t())
            y = y + acc.float() * lin.w_scale[:, g, 0]
    else:
        y = int_mm(q_x, codes.t()).float() * lin.w_scale[:, 0]
    y = y * s_x
    if lin.bias is not None:
        y = y + lin.bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)
