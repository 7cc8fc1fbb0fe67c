"""Selective scans: the SSM recurrence of Mamba and Mamba2, computed three ways.

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

Three ways of computing it:
  * `selective_scan_ref`  exact sequential loop over time; the oracle of the tests, and, with a
                          `state_fn` that quantizes the state after every update, the exact
                          quantized recurrence used by every quantized evaluation;
  * `selective_scan`      Mamba1 parallel path: a chunked scan that discretises position by
                          position (never storing (b, l, d, n) autograd tensors), with its own
                          backward;
  * `ssd_scan`            Mamba2 parallel path: the chunked SSD algorithm (ssd_minimal).
and `ssm_step`, one token of the recurrence for decoding.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

StateFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Generic linear recurrence h_t = a_t * h_{t-1} + u_t, chunked, with an exact backward.
# --------------------------------------------------------------------------------------------

def linear_scan_ref(a: Tensor, u: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Sequential reference of `linear_scan`. a: broadcastable to u (b, l, *s); returns (b, l, *s)."""
    a = a.expand_as(u)
    h = torch.zeros_like(u[:, 0]) if h0 is None else h0.to(u.dtype)
    out = []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def chunk_len(length: int) -> int:
    """Chunk length k ~ sqrt(l): k loop iterations inside chunks plus l/k across chunks."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(length)))))


def to_chunks(t: Tensor, k: int, fill: float = 0.0) -> Tensor:
    """(b, l, *s) -> chunk-major (k, b, c, *s), padding time with `fill` to a multiple of k."""
    b, length = t.shape[:2]
    pad = (-length) % k
    if pad:
        t = torch.cat([t, t.new_full((b, pad) + t.shape[2:], fill)], dim=1)
    return t.reshape((b, -1, k) + t.shape[2:]).movedim(2, 0)


def from_chunks(t: Tensor, length: int) -> Tensor:
    """Chunk-major (k, b, c, *s) -> (b, l, *s), dropping padded steps."""
    k, b, c = t.shape[:3]
    return t.movedim(0, 2).reshape((b, c * k) + t.shape[3:])[:, :length]


def _scan_chunked(a: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool = False) -> Tensor:
    """h = a * h_prev + u over chunk-major tensors (k, b, c, *s), in time order or reversed.

    1. scan all chunks at once, position by position (k steps), from a zero state, keeping the
       cumulative decay; 2. carry the state from chunk to chunk (c steps); 3. add the decayed
       entering state everywhere. Every slice t[j] is contiguous, so each step streams memory.
    """
    k, c = u.shape[0], u.shape[2]
    order = list(range(k))[::-1] if reverse else list(range(k))
    hs = torch.empty_like(u)
    decay = torch.empty(torch.broadcast_shapes(a.shape, u.shape), dtype=u.dtype, device=u.device)
    hs[order[0]] = u[order[0]]
    decay[order[0]] = a[order[0]]
    for prev, j in zip(order[:-1], order[1:]):
        torch.addcmul(u[j], a[j], hs[prev], out=hs[j])
        torch.mul(a[j], decay[prev], out=decay[j])
    last = order[-1]
    start = torch.empty_like(hs[0])                                          # (b, c, *s)
    h = torch.zeros_like(hs[0, :, 0]) if h0 is None else h0.to(u.dtype).expand_as(hs[0, :, 0])
    for i in (range(c - 1, -1, -1) if reverse else range(c)):
        start[:, i] = h
        h = torch.addcmul(hs[last, :, i], decay[last, :, i], h)
    hs.addcmul_(decay, start.unsqueeze(0))
    return hs


class ChunkedLinearScan(torch.autograd.Function):
    """All states of h_t = a_t * h_{t-1} + u_t on chunk-major tensors (k, b, c, *s), with the
    exact backward (itself a linear scan, run backwards in time). `a` may broadcast over *s."""

    @staticmethod
    def forward(ctx, a: Tensor, u: Tensor, h0: Optional[Tensor]):
        hs = _scan_chunked(a, u, h0)
        ctx.save_for_backward(a, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: Tensor):
        a, hs, h0 = ctx.saved_tensors
        # dL/dh_t = G_t + a_{t+1} dL/dh_{t+1}: coefficients shifted one step forward in time
        a_next = torch.empty_like(a)
        a_next[:-1] = a[1:]
        a_next[-1, :, :-1] = a[0, :, 1:]
        a_next[-1, :, -1] = 0
        g = _scan_chunked(a_next, grad_hs.contiguous(), None, reverse=True)
        # dL/da_t = g_t * h_{t-1}
        grad_a = torch.empty_like(g)
        torch.mul(g[1:], hs[:-1], out=grad_a[1:])
        torch.mul(g[0, :, 1:], hs[-1, :, :-1], out=grad_a[0, :, 1:])
        if h0 is None:
            grad_a[0, :, 0] = 0
        else:
            torch.mul(g[0, :, 0], h0, out=grad_a[0, :, 0])
        dims = [i for i, (sa, sg) in enumerate(zip(a.shape, grad_a.shape)) if sa == 1 and sg != 1]
        if dims:
            grad_a = grad_a.sum(dim=dims, keepdim=True)
        grad_h0 = a[0, :, 0] * g[0, :, 0] if h0 is not None else None
        if grad_h0 is not None and grad_h0.shape != h0.shape:
            grad_h0 = grad_h0.sum_to_size(h0.shape)
        return grad_a, g, grad_h0


def linear_scan(a: Tensor, u: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + u_t (time = dim 1), chunked and differentiable.

    a: broadcastable to u; u: (b, l, *s); h0: (b, *s) or None (zeros). Returns (b, l, *s).
    """
    if a.dim() != u.dim():
        raise ValueError("linear_scan: a and u must have the same number of dimensions")
    length = u.shape[1]
    k = chunk_len(length)
    a = to_chunks(a.expand(u.shape[:2] + a.shape[2:]), k, fill=1.0).contiguous()
    hs = ChunkedLinearScan.apply(a, to_chunks(u, k).contiguous(), h0)
    return from_chunks(hs, length)


# --------------------------------------------------------------------------------------------
# Selective SSM: one token step and the exact sequential reference (both families).
# --------------------------------------------------------------------------------------------

def _per_channel(t: Tensor, d: int) -> Tensor:
    """Broadcast a per-group tensor (..., g, n) to per-channel (..., d, n) as a view when possible."""
    g = t.shape[-2]
    return t.unsqueeze(-2).expand(*t.shape[:-1], d // g, t.shape[-1]).reshape(*t.shape[:-2], d, t.shape[-1])


def ssm_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t for one token.
    state (b, d, n); x, dt (b, d); A (d, n) or (d, 1); B (b, g, n). Returns (b, d, n)."""
    d = x.shape[-1]
    dA = torch.exp(dt.unsqueeze(-1) * A)                                   # (b, d, n|1)
    return dA * state + (dt * x).unsqueeze(-1) * _per_channel(B, d)        # (b, d, n)


def ssm_readout(state: Tensor, C: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    """y_t = <h_t, C_t>_n + D x_t. state (b, d, n); C (b, g, n); x (b, d). Returns (b, d)."""
    y = (state * _per_channel(C, x.shape[-1])).sum(-1)                     # (b, d)
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


# --------------------------------------------------------------------------------------------
# Mamba1 parallel path: a chunked scan fused with the discretisation, with a hand-written backward.
# --------------------------------------------------------------------------------------------
#
# Time is split into c chunks of k positions (t = i k + j, chunk i, position j) and the (b, l, d)
# inputs are read in place through (b c, k, d) views. Position j of every chunk at once is one
# "slice" (b c, n, d): n before d, so that the contractions over n (y = <h, C>, dL/dx) and over d
# (dL/dB, dL/dC) are batched vector-matrix products over contiguous rows. Each step reads and
# writes a few slices; `selective_chunk_len` keeps them small enough to stay in cache.
#
# forward   1. a_j = exp(dt_j A) and the scan of every chunk from a zero state (k steps): the
#              state each chunk adds by its end;
#           2. those carried across chunks (c steps): the true state entering every chunk;
#           3. the scan again from the entering states (k steps), reading out y_j = <h_j, C_j>.
#           Kept for the backward: the slices a_j and a_j h_{j-1} (2 n-fold copies of x), as
#           k separate tensors: malloc hands slices of a few MiB back from call to call, where a
#           (b, l, d, n) tensor would be mapped afresh (and page-faulted in) every time.
# backward  the adjoint G_t = dL/dh_t = a_{t+1} G_{t+1} + C_t gy_t runs backwards in time through
#           the same three steps; in step 3 every position's gradients are read off G_j:
#              dL/dB_j = sum_d G_j dt_j x_j      dL/d(dt_j x_j) = sum_n G_j B_j
#              dL/dC_j = sum_d gy_j h_j          dL/ddt_j (through a_j) = sum_n G_j a_j h_{j-1} A
#              dL/dA = sum_{b, t} G_t a_t h_{t-1} dt_t       dL/dh0 = a_0 G_0
# exp(dt A) is computed as exp2(dt A log2(e)): exp2 is about twice as fast on CPU, and the extra
# rounding of the scaled exponent is of the order of that of the product dt A itself.

_LOG2E = math.log2(math.e)
_SLICE_BYTES = 2 ** 21


def selective_chunk_len(batch: int, length: int, d: int, n: int, itemsize: int = 4) -> int:
    """Chunk length k of `selective_scan`: the power of two >= sqrt(l), doubled (at most three
    times, and while more than 2 chunks remain) until one slice (b c, n, d) is at most 2 MiB:
    the half-dozen slices a step touches then stay in cache. (On CPU, 1 MiB slices were no
    faster: they only add steps, each a few parallel ops.)"""
    k = 2 ** math.ceil(math.log2(max(1.0, math.sqrt(length))))
    for _ in range(3):
        c = -(-length // k)
        if c <= 2 or batch * c * n * d * itemsize <= _SLICE_BYTES:
            break
        k *= 2
    return k


def _mamba1_forward(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    h0: Optional[Tensor], k: int, keep: bool,
):
    """Forward of the fused chunked scan, in the dtype of its inputs (all one float dtype).

    x, dt (b, L, d) contiguous with L = c k (dt = 0 on padding: the state passes unchanged);
    A (d, n); B, C (b, L, n) contiguous; D (d,) or None; h0 (b, d, n) or None. Returns y (b, L, d),
    h_L (b, d, n), dt x (b, L, d) and the lists of slices a_j and a_j h_{j-1}, each (b c, n, d)
    (with `keep` one per position, otherwise a single reused buffer for the latter).
    """
    b, L, d = x.shape
    n, c = A.shape[1], L // k
    bc = b * c
    AE = (A * _LOG2E).t().contiguous()                                      # (n, d): exp(dt A) = exp2(dt AE)
    dtx = dt * x                                                            # (b, L, d)
    dt_, dtx_, x_ = dt.view(bc, k, d), dtx.view(bc, k, d), x.view(bc, k, d)  # position j: [:, j:j+1]
    B_, C_ = B.view(bc, k, n), C.view(bc, k, n)                             # position j: [:, j] (bc, n)
    a = [x.new_empty(bc, n, d) for _ in range(k)]                           # a_j = exp(dt_j A)
    ah = [x.new_empty(bc, n, d) for _ in range(k if keep else 1)]           # a_j h_{j-1}

    # 1. every chunk from a zero state: what it adds to the state by its end
    h = x.new_empty(b, c, n, d)
    hs = h.view(bc, n, d)
    for j in range(k):
        torch.exp2(torch.mul(dt_[:, j:j + 1], AE, out=a[j]), out=a[j])
        if j == 0:
            torch.mul(B_[:, j, :, None], dtx_[:, j:j + 1], out=hs)
        else:
            hs.mul_(a[j]).addcmul_(B_[:, j, :, None], dtx_[:, j:j + 1])
    # 2. across chunks: h_in[i + 1] = exp(A sum_j dt_ij) h_in[i] + h[i]
    h_in = torch.empty_like(h)                                              # (b, c, n, d)
    if h0 is None:
        h_in[:, 0] = 0
    else:
        h_in[:, 0] = h0.transpose(1, 2)
    if c > 1:
        decay = torch.exp2(dt_.sum(1).view(b, c, 1, d)[:, :-1] * AE)        # (b, c-1, n, d)
        for i in range(1, c):
            torch.addcmul(h[:, i - 1], decay[:, i - 1], h_in[:, i - 1], out=h_in[:, i])
    # 3. every chunk again from its entering state: the exact states, read out as they come
    hs = h_in.view(bc, n, d)                                                # running state
    y = torch.empty_like(x)
    y_ = y.view(bc, k, d)
    yj = x.new_empty(bc, 1, d)
    for j in range(k):
        ahj = ah[j if keep else 0]
        torch.mul(a[j], hs, out=ahj)
        torch.addcmul(ahj, B_[:, j, :, None], dtx_[:, j:j + 1], out=hs)
        torch.bmm(C_[:, j:j + 1], hs, out=yj)                              # <h_j, C_j>_n
        if D is None:
            y_[:, j:j + 1] = yj
        else:
            torch.addcmul(yj, x_[:, j:j + 1], D, out=y_[:, j:j + 1])
    h_last = h_in[:, -1].transpose(1, 2).contiguous()                       # (b, d, n)
    return y, h_last, dtx, a, ah


def _mamba1_backward(ctx, gy: Tensor, gh: Tensor):
    """Backward of `_mamba1_forward` (see the block comment above). gy (b, L, d); gh (b, d, n)."""
    x, dt, dtx, A, B, C, D = ctx.saved_tensors[:7]
    k = ctx.k
    a, ah = ctx.saved_tensors[7:7 + k], ctx.saved_tensors[7 + k:]
    need_A, need_B, need_C, need_D, need_h0 = ctx.needs_input_grad[2:7]
    b, L, d = x.shape
    n, c = A.shape[1], L // k
    bc = b * c
    AT = A.t().contiguous()                                                 # (n, d)
    gy = gy.contiguous()
    dt_, dtx_, x_, gy_ = (t.view(bc, k, d) for t in (dt, dtx, x, gy))
    B_, C_ = B.view(bc, k, n), C.view(bc, k, n)

    # 1. the adjoint of every chunk from zero at its end back to its start
    G = x.new_empty(b, c, n, d)
    Gs = G.view(bc, n, d)
    for j in range(k - 1, -1, -1):
        if j == k - 1:
            torch.mul(C_[:, j, :, None], gy_[:, j:j + 1], out=Gs)
        else:
            Gs.mul_(a[j + 1]).addcmul_(C_[:, j, :, None], gy_[:, j:j + 1])
    # 2. across chunks, backwards: g_out[i] = a_{i+1, 0} G_{i+1, 0} reaches the end of chunk i,
    #    and G_{i, 0} = G[i] + exp(A sum_{j >= 1} dt_ij) g_out[i]
    g_out = torch.empty_like(G)                                             # (b, c, n, d)
    g = gh.transpose(1, 2)
    g_out[:, -1] = g
    a0 = a[0].view(b, c, n, d)
    span = torch.exp2((dt_.sum(1) - dt_[:, 0]).view(b, c, 1, d) * (AT * _LOG2E))  # (b, c, n, d)
    for i in range(c - 1, -1, -1):
        if i == 0 and not need_h0:
            break
        g = a0[:, i] * torch.addcmul(G[:, i], span[:, i], g)
        if i > 0:
            g_out[:, i - 1] = g
    grad_h0 = g.transpose(1, 2) if need_h0 else None
    # 3. the exact adjoint from the carried values, and every position's gradients
    Gs = g_out.view(bc, n, d)                                               # running adjoint
    P, T = torch.empty_like(Gs), torch.empty_like(Gs)
    acc = torch.zeros_like(Gs) if need_A else None
    s_u, s_a = x.new_empty(bc, 1, d), x.new_empty(bc, 1, d)
    grad_x, grad_dt = torch.empty_like(x), torch.empty_like(x)
    gx_, gdt_ = grad_x.view(bc, k, d), grad_dt.view(bc, k, d)
    gB = x.new_empty(k, bc, 1, n) if need_B else None                       # chunk-major (k, bc, 1, n)
    gC = x.new_empty(k, bc, 1, n) if need_C else None
    for j in range(k - 1, -1, -1):
        if j < k - 1:
            Gs.mul_(a[j + 1])
        Gs.addcmul_(C_[:, j, :, None], gy_[:, j:j + 1])                    # G_j
        if need_C:
            torch.bmm(gy_[:, j:j + 1], ah[j].transpose(1, 2), out=gC[j])   # sum_d gy_j a_j h_{j-1}
        if need_B:
            torch.bmm(dtx_[:, j:j + 1], Gs.transpose(1, 2), out=gB[j])     # sum_d G_j dt_j x_j
        torch.bmm(B_[:, j:j + 1], Gs, out=s_u)                             # dL/d(dt_j x_j)
        torch.mul(Gs, ah[j], out=P)                                         # dL/da_j a_j
        if need_A:
            acc.addcmul_(P, dt_[:, j:j + 1])
        torch.sum(torch.mul(P, AT, out=T), dim=1, keepdim=True, out=s_a)    # dL/ddt_j through a_j
        torch.addcmul(s_a, s_u, x_[:, j:j + 1], out=gdt_[:, j:j + 1])
        torch.mul(s_u, dt_[:, j:j + 1], out=gx_[:, j:j + 1])
    grad_D = None
    if D is not None:
        grad_x.addcmul_(gy, D)
        if need_D:
            grad_D = (gy * x).sum((0, 1))
    grad_A = acc.sum(0).t() if need_A else None
    grad_B = grad_C = None
    if need_B:
        grad_B = gB.view(k, b, c, n).permute(1, 2, 0, 3).reshape(b, L, n)
    if need_C:
        # h_j = a_j h_{j-1} + dt_j x_j B_j: the second term's share of sum_d gy_j h_j
        grad_C = gC.view(k, b, c, n).permute(1, 2, 0, 3).reshape(b, L, n)
        grad_C.addcmul_((gy * dtx).sum(-1, keepdim=True), B)
    return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, grad_h0, None


class _Mamba1Scan(torch.autograd.Function):
    """The fused chunked Mamba1 scan on padded inputs; shapes as `_mamba1_forward`, plus k."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, k):
        y, h_last, dtx, a, ah = _mamba1_forward(x, dt, A, B, C, D, h0, k, keep=True)
        ctx.k = k
        ctx.save_for_backward(x, dt, dtx, A, B, C, D, *a, *ah)
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        return _mamba1_backward(ctx, gy, gh)


def _mamba1_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    h0: Optional[Tensor], k: int,
) -> tuple[Tensor, Tensor]:
    """The fused scan with chunk length k, in the dtype of x (float32 or float64).
    x, dt (b, l, d); A (d, n); B, C (b, l, n); D (d,) or None; h0 (b, d, n) or None."""
    length = x.shape[1]
    dtype = x.dtype
    x, dt, B, C = (t.to(dtype) for t in (x, dt, B, C))
    A = A.to(dtype)
    D = None if D is None else D.to(dtype)
    h0 = None if h0 is None else h0.to(dtype)
    pad = (-length) % k
    if pad:
        # dt = 0 on padded steps: no decay and no input, the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, h0))
    if grad:
        y, h_last = _Mamba1Scan.apply(x, dt, A, B, C, D, h0, k)
    else:
        y, h_last = _mamba1_forward(x, dt, A, B, C, D, h0, k, keep=False)[:2]
    return (y[:, :length] if pad else y), h_last


def selective_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    h0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Mamba1 selective scan, parallel: a chunked scan that builds exp(dt A) and dt x B position
    by position (never as (b, l, d, n) autograd tensors), with a hand-written backward. Shapes as
    `selective_scan_ref` with g = 1. Computed in float32. Returns y (b, l, d) and the final state
    h_l (b, d, n)."""
    b, length, d = x.shape
    k = selective_chunk_len(b, length, d, A.shape[-1])
    return _mamba1_scan(x.float(), dt, A, B[:, :, 0], C[:, :, 0], D, h0, k)


class _Mamba1EndStates(torch.autograd.Function):
    """h_k of every sequence from a zero state, and nothing else: the first pass of ESR's "chunk"
    simulation (`MixerBase.carried_scan`), which needs each chunk's own share of the state at
    its end but no read-out. Forward: the k updates; backward: the adjoint of h_k run back
    through them. x, dt (b, k, d); A (d, n); B (b, k, n) -> h (b, d, n). Layout (b, n, d) inside."""

    @staticmethod
    def forward(ctx, x, dt, A, B):
        b, k, d = x.shape
        AE = (A * _LOG2E).t().contiguous()                                  # (n, d)
        dtx = dt * x                                                        # (b, k, d)
        a, prev = [], []                                                    # a_j, h_{j-1}: (b, n, d)
        h = x.new_zeros(b, A.shape[1], d)
        for j in range(k):
            a.append(torch.exp2(dt[:, j:j + 1] * AE))
            prev.append(h)
            h = torch.addcmul(a[j] * h, B[:, j, :, None], dtx[:, j:j + 1])
        ctx.save_for_backward(x, dt, dtx, A, B, *a, *prev)
        ctx.k = k
        return h.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        x, dt, dtx, A, B = ctx.saved_tensors[:5]
        k = ctx.k
        a, prev = ctx.saved_tensors[5:5 + k], ctx.saved_tensors[5 + k:]
        AT = A.t().contiguous()                                             # (n, d)
        G = gh.transpose(1, 2).contiguous()                                 # adjoint of h_j (b, n, d)
        grad_x, grad_dt = torch.empty_like(x), torch.empty_like(x)
        grad_B = torch.empty_like(B)
        grad_A = torch.zeros_like(AT)
        for j in range(k - 1, -1, -1):
            s_u = torch.bmm(B[:, j:j + 1], G)                               # dL/d(dt_j x_j) (b, 1, d)
            grad_B[:, j:j + 1] = torch.bmm(dtx[:, j:j + 1], G.transpose(1, 2))
            P = G * a[j] * prev[j]                                          # dL/da_j a_j (b, n, d)
            grad_A += (P * dt[:, j:j + 1]).sum(0)
            grad_dt[:, j:j + 1] = (P * AT).sum(1, keepdim=True) + s_u * x[:, j:j + 1]
            grad_x[:, j:j + 1] = s_u * dt[:, j:j + 1]
            G = G * a[j]
        return grad_x, grad_dt, grad_A.t(), grad_B


def chunk_end_states(x: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Mamba1: the state after each sequence from a zero state (the `h_l` of `selective_scan`
    without its outputs). x, dt (b, k, d); A (d, n); B (b, k, g=1, n) -> (b, d, n) float32."""
    x, dt, B = x.float().contiguous(), dt.float().contiguous(), B[:, :, 0].float().contiguous()
    return _Mamba1EndStates.apply(x, dt, A.float(), B)


# --------------------------------------------------------------------------------------------
# Mamba2 parallel path: chunked SSD (state space duality), as ssd_minimal.py.
# --------------------------------------------------------------------------------------------

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
