"""The Mamba2 parallel scan: chunked SSD (state space duality), as `mamba_ssm/modules/ssd_minimal.py`
(Dao & Gu 2024, Listing 1). Same recurrence as `qmamba.models.scan.reference`, with A and dt one
scalar per head: x (b, l, h, p), state (b, h, p, n)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(x: Tensor) -> Tensor:
    """Stable segment sum: out[..., i, j] = sum_{j < m <= i} x[..., m] for j <= i, -inf above.
    x (..., k) -> (..., k, k)."""
    k = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, k)                                 # (..., k, k)
    below = torch.tril(torch.ones(k, k, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    on_or_below = torch.tril(torch.ones(k, k, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~on_or_below, -torch.inf)


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    chunk_size: int, h0: Optional[Tensor] = None,
):
    """Chunked SSD. x (b, l, h, p); dt (b, l, h) (already softplus'ed and clamped); A (h,);
    B, C (b, l, g, n); D (h,) or None; h0 (b, h, p, n). Returns y (b, l, h, p) and the final state
    (b, h, p, n)."""
    b, length, nh, p = x.shape
    g = B.shape[2]
    # the chunk length changes the cost, not the result: a short input needs no full chunk
    chunk_size = min(chunk_size, max(8, 1 << (length - 1).bit_length()))
    pad = (-length) % chunk_size
    x_in = x
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if pad:
        # zero dt on padded steps: no decay and no input, the final state is unchanged
        x, dt, B, C = (F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // chunk_size
    B = B.repeat_interleave(nh // g, dim=2)                                 # (b, l, h, n)
    C = C.repeat_interleave(nh // g, dim=2)                                 # (b, l, h, n)
    X = (x * dt.unsqueeze(-1)).reshape(b, c, chunk_size, nh, p)             # (b, c, k, h, p)
    Adt = (A * dt).reshape(b, c, chunk_size, nh).permute(0, 3, 1, 2)         # (b, h, c, k)
    B = B.reshape(b, c, chunk_size, nh, -1)                                 # (b, c, k, h, n)
    C = C.reshape(b, c, chunk_size, nh, -1)                                 # (b, c, k, h, n)
    A_cumsum = torch.cumsum(Adt, dim=-1)                                    # (b, h, c, k)

    # 1. intra-chunk outputs (diagonal blocks)
    L = torch.exp(segsum(Adt))                                              # (b, h, c, k, k)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. state at the end of each chunk from its own inputs (right factor of off-diagonal blocks)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)                 # (b, h, c, k)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)     # (b, c, h, p, n)
    # 3. inter-chunk recurrence: the states entering each chunk
    if h0 is None:
        h0 = torch.zeros_like(states[:, :1])
    else:
        h0 = h0.float().unsqueeze(1)
    states = torch.cat([h0, states], dim=1)                                 # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))       # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)      # (b, c+1, h, p, n)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output inside each chunk (left factor of off-diagonal blocks)
    state_decay_out = torch.exp(A_cumsum)                                   # (b, h, c, k)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    y = (Y_diag + Y_off).reshape(b, c * chunk_size, nh, p)[:, :length]      # (b, l, h, p)
    if D is not None:
        y = y + D[:, None] * x_in.float()
    return y, final_state
