"""8-bit embedding and lm_head (the `quantize_head` option): int8 codes with one float32 scale
per vocabulary row. A tied head reads the embedding's codes, so tying survives quantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .intmm import blockwise_linear, weight_only
from .linear import check_codes
from .primitives import quantize, symmetric_scale

HEAD_BITS = 8


class QEmbedding(nn.Module):
    def __init__(self, num: int, dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("codes", torch.zeros(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num, 1, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding) -> "QEmbedding":
        w = emb.weight.detach()
        m = cls(w.shape[0], w.shape[1], w.dtype, w.device)
        m.scale.copy_(symmetric_scale(w.float().abs().amax(1, keepdim=True), HEAD_BITS))
        m.codes.copy_(quantize(w.float(), m.scale, HEAD_BITS))
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loading checks the codes: symmetric 8-bit, -128 refused (`check_codes`)."""
        t = state_dict.get(prefix + "codes")
        if t is not None and t.dtype == torch.int8 and t.shape == self.codes.shape:
            check_codes(prefix + "codes", t, HEAD_BITS, t.shape[-1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ids: Tensor) -> Tensor:
        return (F.embedding(ids, self.codes).float() * F.embedding(ids, self.scale)).to(self.dtype)


class TiedQHead(nn.Module):
    """lm_head tied to a QEmbedding: logits = h @ dequant(codes)^T. Holds no tensors itself.

    Never builds a float copy of the whole table: "sim" dequantizes blocks of vocabulary rows,
    "int" (`qmamba.quant.execution.set_execution`) reads the int8 codes in the C kernel."""

    exec_mode = "sim"

    def __init__(self, embedding: QEmbedding):
        super().__init__()
        self._emb = [embedding]          # a list keeps it out of this module's state dict

    def forward(self, hidden: Tensor) -> Tensor:
        emb = self._emb[0]
        h = hidden.reshape(-1, hidden.shape[-1])                            # (m, d)
        if self.exec_mode == "int":
            y = weight_only(h.float(), emb.codes, emb.scale)
        else:
            y = blockwise_linear(h.float(), emb.codes, emb.scale)
        return y.reshape(*hidden.shape[:-1], -1).to(hidden.dtype)
