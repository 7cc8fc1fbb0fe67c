"""DSQ without reconstruction: the best static W8A8 recipe for the linears (measured: see the
README's quality table) and Decoupled Scale Quantization of the state."""

from __future__ import annotations

from .registry import METHODS, Method, register


@register
class DSQ(Method):
    name = "dsq"
    description = "DSQ state quantization (static s_n, per-write s_c) with RTN W8A8 linears, no reconstruction"
    state_quant = "dsq"
    state_scale = "dynamic"


dsq = METHODS["dsq"]
