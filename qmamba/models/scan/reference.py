"""The SSM recurrence of Mamba and Mamba2: one token step and the exact sequential scan.

References: Mamba (Gu & Dao 2023, Algorithm 2), Mamba-2 / SSD (Dao & Gu 2024, Listing 1,
`mamba_ssm/modules/ssd_minimal.py`), `selective_scan_ref` in `mamba_ssm/ops/selective_scan_interface.py`.

Glossary of dimension letters used in every shape comment of this package:
    b  batch                    l  sequence length (time)
    d  SSM channels             n  state size (d_state)
    h  heads (Mamba2)           p  head dim (Mamba2); d = h * p
    g  groups sharing B and C   (Mamba1: g = 1, Mamba2: n_groups)
    c  chunks                   k  positions within a chunk (chunk length)

The recurrence, for every channel and state index (ZOH for A, Euler for B, as in mamba_ssm):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t          state  (b, d, n)
    y_t = <h_t, C_t>_n + D * x_t                               output (b, d)

Mamba1: A is (d, n), dt is per channel. Mamba2: A is one scalar per head, dt is per head, and the
state (b, h, p, n) is the same thing as (b, d, n) with d = h * p. Channels are split into g equal
groups that share B and C, so one sequential reference and one token step serve both families.

Where each way of computing it lives (one module each):
  * `reference`  (this module) `ssm_step`, one token of the recurrence (decoding), and
                 `selective_scan_ref`, the exact sequential loop over time: the oracle of the
                 tests and, with a `state_fn` that quantizes the state after every update, the
                 exact quantized recurrence of every quantized evaluation;
  * `linear`     the generic linear recurrence h_t = a_t h_{t-1} + u_t, chunked, with an exact
                 backward (`linear_scan`; ESR's simulations);
  * `mamba1`     the Mamba1 parallel path: a chunked scan that discretises position by position
                 (never storing (b, l, d, n) autograd tensors), with its own backward, and the
                 end-state-only scan of ESR's "chunk" simulation;
  * `ssd`        the Mamba2 parallel path: the chunked SSD algorithm (ssd_minimal).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

StateFn = Callable[[Tensor], Tensor]


def per_channel(t: Tensor, d: int) -> Tensor:
    """Broadcast a per-group tensor (..., g, n) to per-channel (..., d, n) as a view when possible."""
    g = t.shape[-2]
    return t.unsqueeze(-2).expand(*t.shape[:-1], d // g, t.shape[-1]).reshape(*t.shape[:-2], d, t.shape[-1])


def ssm_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t for one token.
    state (b, d, n); x, dt (b, d); A (d, n) or (d, 1); B (b, g, n). Returns (b, d, n)."""
    d = x.shape[-1]
    dA = torch.exp(dt.unsqueeze(-1) * A)                                   # (b, d, n|1)
    return dA * state + (dt * x).unsqueeze(-1) * per_channel(B, d)        # (b, d, n)


def ssm_readout(state: Tensor, C: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    """y_t = <h_t, C_t>_n + D x_t. state (b, d, n); C (b, g, n); x (b, d). Returns (b, d)."""
    y = (state * per_channel(C, x.shape[-1])).sum(-1)                     # (b, d)
    return y if D is None else y + D * x


def ssm_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    state_fn: Optional[StateFn] = None,
) -> tuple[Tensor, Tensor]:
    """One token: update the state, pass it through `state_fn` (what storing it does to it),
    read out. Shapes as `ssm_update` / `ssm_readout`. Returns y (b, d) and the new state."""
    state = ssm_update(state, x, dt, A, B)
    if state_fn is not None:
        state = state_fn(state)
    return ssm_readout(state, C, x, D), state


def selective_scan_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    h0: Optional[Tensor] = None, state_fn: Optional[StateFn] = None,
) -> tuple[Tensor, Tensor]:
    """Exact sequential scan: the oracle, and with `state_fn` the exact quantized recurrence.

    x, dt (b, l, d); A (d, n) or (d, 1); B, C (b, l, g, n); D (d,) or None; h0 (b, d, n).
    `state_fn(h)` is applied to the state after every update (e.g. quantize-dequantize), so the
    next token sees exactly what a stored state would give it. Computed in float32.
    Returns y (b, l, d), h_l (b, d, n).
    """
    b, length, d = x.shape
    h = x.new_zeros((b, d, B.shape[-1]), dtype=torch.float32) if h0 is None else h0.float()
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    ys = []
    for t in range(length):
        y, h = ssm_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], None, state_fn)
        ys.append(y)
    y = torch.stack(ys, dim=1)                                              # (b, l, d)
    if D is not None:
        y = y + D * x
    return y, h
