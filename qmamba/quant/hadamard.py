"""Hadamard rotations: orthonormal Hadamard matrices, the fast Walsh-Hadamard transform, and
`Rotate`, the module that rotates an activation online (Quamba's rotation of out_proj's input).

Quamba (Chiang et al. 2024, "Quamba: A Post-Training Quantization Recipe for Selective State
Space Models") and QuaRot use a full-width Hadamard transform, built for widths that are not a
power of two (Mamba's d_inner 1536 = 12 * 128, 2560 = 20 * 128, 5120 = 40 * 128, ...) from the
known Hadamard matrices of order 12, 20, 28, 40 times a power of two, applied by fast kernels.
We use a simpler orthogonal choice: a block-diagonal matrix of Sylvester Hadamard blocks of size
m, the largest power of two dividing the width n (1536 -> 3 blocks of 512, 2560 -> 5 of 512,
5120 -> 5 of 1024). It spreads an outlier over m channels instead of n, which is what matters
for a per-tensor activation scale. An odd n gives m = 1, the identity: no rotation at all.

Every matrix here is symmetric and orthogonal (H = H^T, H H^T = I), so x -> x H is undone by
x H -> (x H) H.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def block_size(n: int) -> int:
    """m: the largest power of two dividing n (the Hadamard block of width n)."""
    if n <= 0:
        raise ValueError(f"a Hadamard width must be positive, got {n}")
    return n & -n


def sylvester(m: int) -> Tensor:
    """The (m, m) Sylvester Hadamard matrix of +-1 (m a power of two), int8:
    H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]."""
    if m <= 0 or m & (m - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, got {m}")
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal (n, n) Hadamard matrix: Sylvester's for n a power of two, otherwise the
    block-diagonal of n / m Sylvester blocks of size m = `block_size(n)`; entries +-1/sqrt(m)."""
    m = block_size(n)
    block = sylvester(m).to(dtype) / math.sqrt(m)
    return torch.block_diag(*[block] * (n // m))


def fwht(x: Tensor) -> Tensor:
    """Fast Walsh-Hadamard transform over the last dim: x (..., n) -> x @ hadamard(n), in
    O(n log m) per row (log2(m) butterfly passes, m = `block_size(n)`), normalised."""
    n = x.shape[-1]
    m = block_size(n)
    y = x
    h = 1
    while h < m:
        # every run of 2h consecutive entries holds the pairs (a, b) at distance h;
        # runs never straddle a block since 2h divides m, which divides n
        pairs = y.reshape(-1, 2, h)                                           # (rows * n / 2h, 2, h)
        a, b = pairs[:, 0], pairs[:, 1]
        y = torch.stack([a + b, a - b], dim=1)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(m)


class Rotate(nn.Module):
    """x (..., n) -> x @ hadamard(n), by the fast Walsh-Hadamard transform in float32, returned
    in x's dtype. Holds no tensor: the block size follows from n (`block_size`), so the rotation
    costs no memory and nothing in the checkpoint (a stored +-1 matrix would be m^2 bytes per
    layer, 1 MiB at m = 1024, counted against the method in every memory report)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.m = n, block_size(n)

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.n // self.m} Hadamard block(s) of {self.m}"

    def forward(self, x: Tensor) -> Tensor:
        return fwht(x.float()).to(x.dtype)
