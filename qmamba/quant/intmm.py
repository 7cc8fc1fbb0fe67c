"""Integer execution of quantized linears: int8 activations x int8 weights -> int32, scales after.

    y = (s_x * s_w) * (q_x @ q_w^T) + bias       q_x = round(x / s_x) in [-127, 127] (int8)

`torch._int_mm` does the product (CUDA, and CPU through oneDNN; exact int32 accumulation). W4
weights are unpacked to int8 per call; group-wise weights take one product per group. The
simulated path of `QLinear.forward` computes the same sum in float32 from dequantized operands,
so the two agree up to float rounding (tests/quant/test_intmm.py).

Which is faster depends on the machine: `_int_mm` is fast where the CPU has int8 dot-product
instructions (VNNI, AMX) or on CUDA, and slow on plain AVX2 CPUs, where `qmamba bench` shows it;
`set_execution(model, "int")` switches a model's linears, "sim" switches back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation import ActQuantizer
from .linear import QLinear

MODES = ("sim", "int")


def _split_input_quant(iq: nn.Module):
    """(pre, ActQuantizer): Quamba wraps its quantizer after a rotation."""
    if isinstance(iq, ActQuantizer):
        return None, iq
    if isinstance(iq, nn.Sequential) and isinstance(iq[-1], ActQuantizer):
        return iq[:-1], iq[-1]
    return None, None


def supports_int(lin: QLinear) -> bool:
    _, aq = _split_input_quant(lin.input_quant)
    return lin.w_bits is not None and aq is not None and aq.bits == 8 and aq.mode == "quant"


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """(m, k) int8 @ (k, n) int8 -> (m, n) int32; pads m to 17 rows on CUDA (its minimum)."""
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
    return torch._int_mm(a, b)[:m]


def linear_int(lin: QLinear, x: Tensor) -> Tensor:
    """`lin(x)` through integer products. x (..., k) float -> (..., n) in x's dtype."""
    pre, aq = _split_input_quant(lin.input_quant)
    if pre is not None:
        x = pre(x)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()                                   # (m, k)
    s_x = aq.current_scale(x2).float()                                      # () or (m, 1)
    q_x = torch.round(x2 / s_x).clamp(-127, 127).to(torch.int8)
    codes = lin.codes()                                                     # (n, k) int8
    if lin.group_size:
        gs = lin.group_size
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


def set_execution(model: nn.Module, mode: str) -> int:
    """Run every eligible QLinear (W-bit weights, 8-bit input quantizer) as integer products
    ("int") or through dequantized float weights ("sim"). Returns how many were switched."""
    if mode not in MODES:
        raise ValueError(f"execution mode must be one of {MODES}")
    count = 0
    for m in model.modules():
        if isinstance(m, QLinear) and supports_int(m):
            m.exec_mode = mode
            count += 1
    return count
