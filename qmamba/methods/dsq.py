"""DSQ without reconstruction: the best static W8A8 recipe for the linears (measured: see the
README's quality table) and Decoupled Scale Quantization of the state."""

from __future__ import annotations

from .registry import register
from .rtn import calibrate_and_round


@register("dsq", "DSQ state quantization (static s_n, per-write s_c) with RTN W8A8 linears, no reconstruction",
          state_quant="dsq", state_scale="dynamic")
def dsq(model, qcfg, calib, progress=True):
    return calibrate_and_round(model, qcfg, calib, progress=progress)
