"""What the scan tests share: a relative comparison, gradients, and a fixed probe for losses."""

from __future__ import annotations

import torch

LENGTHS = (1, 7, 37, 64)


def assert_close(actual, expected, rtol=1e-5, name=""):
    """|actual - expected| <= rtol * max|expected| elementwise (+ a tiny floor for all-zero refs)."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{name}: max |diff| {err:.3e} vs max |ref| {scale:.3e}"


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def probe(t: torch.Tensor, phase: float = 0.0) -> torch.Tensor:
    """A fixed, non-constant output weight: the loss is <t, probe> (gradients differ per element)."""
    return torch.sin(torch.arange(t.numel(), dtype=t.dtype) * 0.7 + phase).view_as(t)
