"""Quantization simulations of the state recurrence for ESR (Efficient Selectivity
Reconstruction), the training-time stand-ins for the exact quantized recurrence

    h_t = Q(a_t h_{t-1} + u_t),  a_t = exp(dt_t A),  u_t = dt_t x_t B_t,  y_t = <h_t, C_t> + D x_t

which is non-linear in time and so has no parallel scan. Each simulation is differentiable
(straight-through rounding; the quantizer's scales get LSQ-style gradients) and returns y:

  "readout"  (A) FP parallel scan, then y_t = <Q(h_t), C_t>: every read sees a quantized state,
             but quantization errors do not propagate through time;
  "chunk"    (B) quantize only the states carried between chunks of `chunk` tokens: errors
             propagate from chunk to chunk, the scan inside a chunk stays float and parallel
             (the mixer's own SSD / chunked scan over all chunks at once, see
             `MixerBase.carried_scan`; no per-token states are materialised);
  "errscan"  (C) error propagation: Q(a h + u) = a h + u + e, so the quantized trajectory is the FP
             one plus a second LINEAR scan of the per-step errors e_t = Q(h_t) - h_t, estimated on
             the FP states h_t; both scans are parallel;
  "exact"    (D) the exact sequential recurrence with straight-through rounding (the reference;
             a Python loop over time under autograd, slow).

ESR's default is "exact": on the dev texts (benchmarks/esr_dev_sweep.py, ref-mamba2, W8A8H4) it
gave a lower KL divergence to the float model than "chunk" beyond the paired 95% interval on both
dev texts (0.0137 vs 0.0220 and 0.0341 vs 0.0414) at about 7x the reconstruction time; "chunk"
(`sim="chunk"`, `--esr-sim chunk`) is the fast choice. "readout" and "errscan" materialise
(b, l, d, n) states and are slower than "chunk" on CPU.

Shapes use the glossary of `qmamba.models.scan.reference` (per-channel forms: x, dt (b, l, d); A (d, n) or
(d, 1); B, C (b, l, g, n); D (d,)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..models.scan.linear import linear_scan
from ..models.scan.reference import per_channel, selective_scan_ref

SIMS = ("readout", "chunk", "errscan", "exact")


def _discretize(x: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """a (b, l, d, n|1) and u (b, l, d, n) of the recurrence."""
    d = x.shape[-1]
    a = torch.exp(dt.float().unsqueeze(-1) * A)                             # (b, l, d, n|1)
    u = (dt.float() * x.float()).unsqueeze(-1) * per_channel(B.float(), d)  # (b, l, d, n)
    return a, u


def _fake(quantizer, hs: Tensor) -> Tensor:
    """Fake-quantize every state of a trajectory (b, l, d, n)."""
    b, length = hs.shape[:2]
    return quantizer.fake_quant(hs.flatten(0, 1)).unflatten(0, (b, length))


def _readout(hs: Tensor, x: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
    y = (hs * per_channel(C.float(), x.shape[-1])).sum(-1)                 # (b, l, d)
    return y if D is None else y + D * x.float()


class StateSim(nn.Module):
    """Installed as `mixer.state_sim`; the mixer calls it in training mode, with its native scan
    inputs, instead of the exact quantized recurrence. Holds no parameters (it reads the
    mixer's state quantizer)."""

    def __init__(self, kind: str, quantizer, chunk: int = 32):
        super().__init__()
        if kind not in SIMS:
            raise ValueError(f"unknown ESR simulation {kind!r}; choose one of {', '.join(SIMS)}")
        self.kind, self.chunk = kind, chunk
        self._q = [quantizer]          # not a submodule: its parameters belong to the mixer

    def forward(self, mixer, x, dt, B, C, h0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        q = self._q[0]
        if self.kind == "chunk":
            # the mixer's own parallel scan over all chunks at once, the carried states quantized
            # in a short loop over chunks: no (b, l, d, n) tensor is ever built
            return mixer.carried_scan(x, dt, B, C, h0, self.chunk, q.fake_quant)
        x, dt, A, B, C, D = mixer.per_channel(x, dt, B, C)
        if self.kind == "exact":
            return selective_scan_ref(x, dt, A, B, C, D, h0, q.fake_quant)
        a, u = _discretize(x, dt, A, B)
        hs = linear_scan(a, u, h0)                                          # (b, l, d, n) FP states
        if self.kind == "readout":
            hq = _fake(q, hs)
        else:   # errscan
            e = _fake(q, hs) - hs                                           # per-step errors at FP states
            hq = hs + linear_scan(a, e, None)
        return _readout(hq, x, C, D), hq[:, -1]
