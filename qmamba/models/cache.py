"""The recurrent cache of a model: per layer, the conv state and the SSM state of a Mamba layer,
the keys and values of an attention layer (`KVState`), nothing for an MLP or MoE layer (`NoState`).

The SSM state lives behind a small interface (`read`, `write`) so that the quantized cache of
`qmamba.quant.state` (integers plus scales) plugs in where the float one is; `write` returns what
the next token will read back, so the float path and the quantized path run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from .scan.reference import ssm_readout, ssm_update


class SSMState:
    """Float SSM state (b, d, n) stored in the cache's dtype (the model's, as transformers and
    mamba_ssm store it); the recurrence itself always runs in float32."""

    def __init__(self, h: Tensor):
        self.h = h

    def read(self) -> Tensor:
        return self.h.float()

    def write(self, h: Tensor) -> Tensor:
        self.h = h.to(self.h.dtype)
        return self.h.float()

    def step(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        """One token: h <- exp(dt A) h + dt x B, stored; returns <h, C> (b, d).
        x, dt (b, d) float32; A (d, n) or (d, 1); B, C (b, g, n)."""
        h = self.write(ssm_update(self.read(), x, dt, A, B))
        return ssm_readout(h, C, x, None)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that hold the state in memory (for the memory report)."""
        return {"h": self.h}


@dataclass
class LayerState:
    conv: Tensor          # (b, conv_dim, w-1): the last inputs of the causal conv
    ssm: SSMState         # (b, d, n) behind read()/write()

    def tensors(self) -> dict[str, Tensor]:
        return {"conv": self.conv, **{f"ssm.{k}": v for k, v in self.ssm.tensors().items()}}


class KVState:
    """The keys and values an attention layer has seen: k, v (b, kv_heads, t, head_dim) in the
    cache's dtype, keys after RoPE, t the tokens consumed so far. It grows by concatenation
    (`append`), so its size is that of the context; `length` is the position of the next token."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new tokens' k, v (b, kv_heads, l, head_dim); returns all keys and values."""
        self.k = torch.cat([self.k, k.to(self.k.dtype)], dim=2)
        self.v = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        return self.k, self.v

    def tensors(self) -> dict[str, Tensor]:
        return {"kv.k": self.k, "kv.v": self.v}


class NoState:
    """The state of a layer that keeps none (MLP, MoE)."""

    def tensors(self) -> dict[str, Tensor]:
        return {}


@dataclass
class InferenceCache:
    layers: list = field(default_factory=list)
    seqlen: int = 0       # tokens already consumed

    def __iter__(self) -> Iterator[LayerState]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerState:
        return self.layers[i]

    def nbytes(self) -> dict[str, int]:
        """Bytes of the real tensors held, by kind of state (conv, ssm, kv: a tensor named "ssm.h"
        is of kind "ssm")."""
        out = {"conv": 0, "ssm": 0}
        for layer in self.layers:
            for name, t in layer.tensors().items():
                kind = name.split(".")[0]
                out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
        return out
