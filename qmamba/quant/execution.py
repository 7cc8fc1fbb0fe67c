"""How a quantized model's linears run: through dequantized float weights ("sim", the default,
what evaluations use) or through integer products ("int", `qmamba.quant.intmm`)."""

from __future__ import annotations

from torch import nn

from .embedding import TiedQHead
from .intmm import supports_int
from .linear import QLinear

MODES = ("sim", "int")


def set_execution(model: nn.Module, mode: str) -> int:
    """Run every eligible QLinear (integer weights; an 8-bit input quantizer or none) and the
    tied 8-bit lm_head through integer weights ("int") or through dequantized float weights
    ("sim"). Returns how many modules were switched."""
    if mode not in MODES:
        raise ValueError(f"execution mode must be one of {MODES}")
    count = 0
    for m in model.modules():
        if (isinstance(m, QLinear) and supports_int(m)) or isinstance(m, TiedQHead):
            m.exec_mode = mode
            count += 1
    return count
