"""How a quantized model's linears run: through dequantized float weights ("sim", the default,
what evaluations use) or through integer products ("int", `qmamba.quant.intmm`).

Integer execution is the deployment path: besides the integer products, the RMS norms and
Mamba2's SiLU and softplus of its decode step are computed in float64 and rounded once to float32
(`float64_numerics`, see `qmamba.models.layers.float64_step`), and a Mamba2 model decodes each
token with one native call (`qmamba.quant.native_decode`), which reproduces those numbers bit for
bit."""

from __future__ import annotations

from torch import nn

from ..models.layers import GatedRMSNorm, RMSNorm
from ..models.mamba2 import Mamba2Mixer
from .embedding import TiedQHead
from .intmm import supports_int
from .linear import QLinear
from .native_decode import model_step

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
        elif isinstance(m, (RMSNorm, GatedRMSNorm, Mamba2Mixer)):
            m.float64_numerics = mode == "int"
    if hasattr(model, "native_step"):
        model.native_step = model_step if mode == "int" else None
    return count
