"""The arguments of one Mamba2 block for the whole-model decode kernel (`mamba2_model_step` of
cpu/int8_cpu.c), as a dataclass of tensors and numbers, and its ctypes mirror of the C struct
`qm_mamba2_layer` (field for field; `cpu_native` checks the sizes agree).

Letters: b batch, D d_model, d d_inner (h heads of p = headdim channels), n d_state, g groups,
cd = d + 2 g n conv channels, w conv width, N = d + cd + h rows of in_proj, G groups of columns
of a weight (group size gs; G = 1 per output channel).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from typing import Optional

from torch import Tensor


@dataclass
class Mamba2Layer:
    D: int
    d: int
    n: int
    g: int
    headdim: int
    w: int
    norm_w: Tensor                  # (D,) float32, the block's RMSNorm
    norm_eps: float
    in_w: Tensor                    # (N, D) int8 codes of in_proj
    in_sums: Tensor                 # (N, G) int32 row sums of the codes per group (the VNNI builds)
    in_sw: Tensor                   # (N, G) float32 weight scales
    in_gs: int
    in_bias: Optional[Tensor]       # (N,) float32
    in_sx: float                    # the static input scale (unused when dynamic)
    in_dynamic: bool
    dt_bias: Tensor                 # (h,)
    dt_lo: float
    dt_hi: float
    s_conv: float                   # the static 8-bit scales of the conv input, x, B, C, dt and z
    sx: float
    sB: float
    sC: float
    sdt: float
    sz: float
    conv_state: Tensor              # (b, cd, w - 1) int8, updated in place
    conv_w: Tensor                  # (cd, w) float32
    conv_b: Optional[Tensor]        # (cd,)
    A: Tensor                       # (d, 1) float32, each head's A repeated over its channels
    Dskip: Tensor                   # (d,)
    codes: Tensor                   # the integer SSM state (see dsq_scan), updated in place
    scales: Tensor                  # (b, d, 1) float16 when dynamic (else empty), updated in place
    s_n: Tensor                     # (n,) float32
    s_c: Tensor                     # (d, 1) float32
    dynamic: bool
    per_byte: int
    qmax: float
    gnorm_w: Tensor                 # (d,) the gated RMSNorm
    group_size: int
    gnorm_eps: float
    out_w: Tensor                   # (D, d) int8 codes of out_proj
    out_sums: Tensor
    out_sw: Tensor
    out_gs: int
    out_bias: Optional[Tensor]
    out_sx: float
    out_dynamic: bool


_C_TYPES = {int: ctypes.c_int64, bool: ctypes.c_int32, Tensor: ctypes.c_void_p, Optional[Tensor]: ctypes.c_void_p}
_DOUBLE = ("norm_eps", "gnorm_eps")         # the float fields C holds in double; the others float
_INT32 = ("per_byte",)


def _c_type(f):
    if f.name in _DOUBLE:
        return ctypes.c_double
    if f.name in _INT32:
        return ctypes.c_int32
    kind = {"int": int, "bool": bool, "float": float, "Tensor": Tensor, "Optional[Tensor]": Optional[Tensor]}[f.type]
    return ctypes.c_float if kind is float else _C_TYPES[kind]


class CLayer(ctypes.Structure):
    _fields_ = [(f.name, _c_type(f)) for f in fields(Mamba2Layer)]


def to_c(layer: Mamba2Layer) -> CLayer:
    """The C struct of one layer: tensors as their data pointers (the layer keeps them alive)."""
    out = CLayer()
    for f in fields(Mamba2Layer):
        v = getattr(layer, f.name)
        setattr(out, f.name, v.data_ptr() if isinstance(v, Tensor) else v)
    return out


class Mamba2Layers(list):
    """The layers of one model and batch, in order; their C array built once, on first use, and
    the kernel's scratch per batch size (`scratch`, kept here so that no token allocates)."""

    _c = None

    def __init__(self, layers=()):
        super().__init__(layers)
        self.scratch: dict = {}

    def c_array(self) -> ctypes.Array:
        if self._c is None:
            self._c = (CLayer * len(self))(*(to_c(layer) for layer in self))
        return self._c
