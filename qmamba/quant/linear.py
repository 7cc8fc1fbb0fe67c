"""Quantized linear layer: integer weights (int8, or int4 packed two per byte) with float32
scales per output channel or per group along the input dim, an optional input (activation)
quantizer, and a float bias.

The simulated forward dequantizes the stored integers, so a model behaves the same before it is
saved and after it is reloaded, bit for bit. Integer execution (int8 x int8 -> int32 products) is
`qmamba.quant.intmm`'s job; it reads the same buffers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import QMambaError
from .activation import ActQuantizer
from .primitives import dequantize_weight, pack, qrange, quantize, symmetric_scale, to_groups, unpack

CLIP_MIN = 0.3      # learned weight clipping never shrinks a range below 30%


def weight_scale(w: Tensor, bits: int, group_size: int = 0, clip: Optional[Tensor] = None) -> Tensor:
    """Symmetric scales of a weight (out, in): (out, 1) per channel or (out, in / gs, 1) per group.
    `clip` (same shape, in (0, 1]) shrinks the range (learnable weight clipping)."""
    w = w.float()
    amax = to_groups(w, group_size).abs().amax(-1, keepdim=True) if group_size else w.abs().amax(-1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    return symmetric_scale(amax, bits)


def quantize_weight(w: Tensor, bits: int, group_size: int = 0, clip: Optional[Tensor] = None):
    """Integer codes (out, in) int8 and scales for a weight."""
    scale = weight_scale(w, bits, group_size, clip)
    wg = to_groups(w.float(), group_size) if group_size else w.float()
    q = quantize(wg, scale, bits)
    return (q.flatten(-2) if group_size else q), scale


def check_codes(name: str, stored: Tensor, bits: int, size: int, rows: int = 4096) -> None:
    """Refuse stored weight codes (as `pack` stores them, `size` codes a row) outside the
    symmetric range [-qmax, qmax] of `bits`, e.g. -128 at 8 bits: qmamba never writes them, and
    the C kernel's int8 product cannot negate -128 (integer and simulated runs would differ).
    One QMambaError line naming the tensor; rows are unpacked a block at a time."""
    if stored.device.type == "meta" or stored.numel() == 0:
        return
    qmax = qrange(bits)[1]
    for i in range(0, stored.shape[0], rows):
        q = unpack(stored[i:i + rows], bits, size)
        lo, hi = int(q.min()), int(q.max())
        if lo < -qmax or hi > qmax:
            bad = lo if lo < -qmax else hi
            raise QMambaError(f"tensor {name} holds the code {bad}, outside the range [-{qmax}, {qmax}] of "
                              f"symmetric {bits}-bit codes that qmamba writes (and its integer kernels "
                              "need): the checkpoint is damaged or was not written by qmamba")


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: Optional[int],
                 group_size: int = 0, input_quant: Optional[ActQuantizer] = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        if w_bits is not None and group_size and in_features % group_size:
            raise ValueError(f"weight group size {group_size} does not divide the {in_features} input "
                             "features (the last columns would have no scale); use per-channel scales")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.group_size = w_bits, group_size
        self.input_quant = input_quant if input_quant is not None else nn.Identity()
        if w_bits is None:           # activation-only quantization (e.g. W16A8)
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        else:
            cols = (in_features + 1) // 2 if w_bits <= 4 else in_features
            qdtype = torch.uint8 if w_bits <= 4 else torch.int8
            self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=qdtype, device=device))
            sshape = (out_features, in_features // group_size, 1) if group_size else (out_features, 1)
            self.register_buffer("w_scale", torch.ones(sshape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, w_bits: Optional[int], group_size: int = 0,
                    input_quant: Optional[ActQuantizer] = None, clip: Optional[Tensor] = None) -> "QLinear":
        w = lin.weight.detach()
        if w_bits is not None and group_size and w.shape[1] % group_size:
            group_size = 0          # groups must tile the input dim; fall back to per channel
        m = cls(w.shape[1], w.shape[0], lin.bias is not None, w_bits, group_size, input_quant,
                dtype=w.dtype, device=w.device)
        with torch.no_grad():
            if w_bits is None:
                m.weight.copy_(w)
            else:
                q, scale = quantize_weight(w, w_bits, group_size, clip)
                m.qweight.copy_(pack(q, w_bits))
                m.w_scale.copy_(scale)
            if lin.bias is not None:
                m.bias.copy_(lin.bias.detach())
        return m

    @torch.no_grad()
    def quantize_weights_(self, w_bits: int, group_size: int = 0, clip: Optional[Tensor] = None) -> "QLinear":
        """Replace the float weight by integer codes and scales, in place."""
        if self.w_bits is not None:
            raise ValueError("weights are already quantized")
        w = self.weight.detach()
        if group_size and w.shape[1] % group_size:
            group_size = 0
        q, scale = quantize_weight(w, w_bits, group_size, clip)
        del self.weight
        self.w_bits, self.group_size = w_bits, group_size
        self.register_buffer("qweight", pack(q, w_bits))
        self.register_buffer("w_scale", scale)
        return self

    # ---------------------------------------------------------------- ESR: learnable clipping
    def learn_weight_clipping(self, w_bits: int, group_size: int = 0) -> nn.Parameter:
        """Fake-quantize the (float) weight at `w_bits` in forward with learnable clip factors
        (per output channel or group, initialised at 1 = round-to-nearest); returns them."""
        if group_size and self.in_features % group_size:
            group_size = 0
        self.learn_bits, self.learn_group = w_bits, group_size
        shape = (self.out_features, self.in_features // group_size, 1) if group_size else (self.out_features, 1)
        self.w_clip = nn.Parameter(torch.ones(shape, device=self.weight.device))
        return self.w_clip

    def learned_clip(self) -> Tensor:
        return self.w_clip.clamp(CLIP_MIN, 1.0)

    def _fake_weight(self) -> Tensor:
        w = self.weight.float()
        scale = weight_scale(w, self.learn_bits, self.learn_group, self.learned_clip())
        wg = to_groups(w, self.learn_group) if self.learn_group else w
        qmax = qrange(self.learn_bits)[1]
        v = wg / scale
        q = torch.round(v.detach()).clamp(-qmax, qmax) + (v - v.detach()) * (v.detach().abs() <= qmax)
        w_hat = q * scale
        return w_hat.flatten(-2) if self.learn_group else w_hat

    @torch.no_grad()
    def finish_weight_learning(self) -> "QLinear":
        """Round the weight with the learned clip factors (what forward simulated), in place."""
        clip = self.learned_clip().detach()
        bits, group = self.learn_bits, self.learn_group
        del self.w_clip
        del self.learn_bits, self.learn_group
        return self.quantize_weights_(bits, group, clip)

    def extra_repr(self) -> str:
        w = "float" if self.w_bits is None else f"W{self.w_bits}" + (f" g{self.group_size}" if self.group_size else "")
        return f"in={self.in_features}, out={self.out_features}, {w}, bias={self.bias is not None}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loading (checkpoints included) checks the weight codes first: see `check_codes`."""
        key = prefix + "qweight"
        if self.w_bits is not None and key in state_dict:
            t = state_dict[key]
            if t.dtype == self.qweight.dtype and t.shape == self.qweight.shape:    # else: a shape error
                check_codes(key, t, self.w_bits, self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codes(self) -> Tensor:
        """Weight codes (out, in) int8."""
        return unpack(self.qweight, self.w_bits, self.in_features)

    def dequantized_weight(self, dtype=torch.float32) -> Tensor:
        if self.w_bits is None:
            return self.weight.to(dtype)
        return dequantize_weight(self.codes(), self.w_scale, self.group_size, dtype)

    exec_mode = "sim"           # "int": integer products (`qmamba.quant.execution.set_execution`)

    def forward(self, x: Tensor) -> Tensor:
        if self.exec_mode == "int":
            from .intmm import linear_int

            return linear_int(self, x)
        x = self.input_quant(x)
        w = (self._fake_weight() if hasattr(self, "w_clip") else self.dequantized_weight(torch.float32)).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
