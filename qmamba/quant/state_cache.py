"""The SSM state cache of decoding, stored as integers: `QuantizedSSMState`, what a
`StateQuantizer` allocates (`qmamba.quant.state`). Shapes: the letters of
`qmamba.models.scan.reference`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.cache import SSMState
from .primitives import codes_per_byte, pack_codes, unpack_codes
from .qscan import cache_step


class QuantizedSSMState(SSMState):
    """The SSM state of one layer stored as integers: codes int8 (b, d, n) for 5..8 bits, two
    codes per byte (b, d, n/2) uint8 for 3..4 bits, four per byte (b, d, n/4) uint8 for 2 bits
    (the last dim padded with zero codes), plus float16 per-write scales."""

    def __init__(self, quantizer, batch: int, device):
        """`quantizer`: the layer's `StateQuantizer` (its bits, shapes and scale mode)."""
        q = quantizer
        self.per_byte = codes_per_byte(q.bits, dense=True)
        cols = -(-q.n // self.per_byte)
        self.quantizer = q
        self.codes = torch.zeros(batch, q.d, cols, dtype=torch.uint8 if self.per_byte > 1 else torch.int8,
                                 device=device)
        shape = q.dynamic_shape(batch)
        self.scales = torch.zeros(shape, dtype=torch.float16, device=device)   # (b, 0) when static

    def read(self) -> Tensor:
        q = self.quantizer
        return q.dequantize(unpack_codes(self.codes, self.per_byte, q.n),
                            self.scales if q.scale_mode == "dynamic" else None)

    def write(self, h: Tensor) -> Tensor:
        q = self.quantizer
        codes, scale = q.quantize(h)
        self.codes = pack_codes(codes, self.per_byte)
        if scale is not None:
            self.scales = scale.half()
        return q.dequantize(codes, scale)

    def step(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        """One token read from and written back to the packed codes in one fused step (same
        numbers as read -> update -> write -> read-out; tests/quant/test_state.py)."""
        return cache_step(self, x, dt, A, B, C)

    def tensors(self) -> dict[str, Tensor]:
        out = {"codes": self.codes}
        if self.scales.numel():
            out["scales"] = self.scales
        return out
