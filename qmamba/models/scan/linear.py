"""The generic linear recurrence h_t = a_t * h_{t-1} + u_t over time (dim 1), chunked, with an
exact backward: `linear_scan` (ESR's exact simulation runs the quantized state's recurrence
through it) and its sequential reference `linear_scan_ref`. Shapes: the letters of
`qmamba.models.scan.reference`; *s any trailing state shape."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


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
