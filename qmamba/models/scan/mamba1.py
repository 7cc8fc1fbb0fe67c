"""The Mamba1 parallel scan: a chunked scan fused with the discretisation, with a hand-written
backward (`selective_scan`), and the end-state-only scan of ESR's "chunk" simulation
(`chunk_end_states`). Same recurrence and shapes as `qmamba.models.scan.reference` (g = 1)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
