"""Quamba (Chiang et al. 2024, "Quamba: A Post-Training Quantization Recipe for Selective State
Space Models", arXiv:2410.13229): static W8A8 for Mamba with two fixes for the activations that
break a per-tensor scale.

  * The SSM input x (the scan input and, in Mamba1, x_proj's input) has rare large values: its
    static scale comes from a high percentile of |x| (option `percentile`, 99.999) instead of the
    max, clipping those few values.
  * The input y of out_proj (Mamba1: y * silu(z); Mamba2: the gated RMSNorm output) has outlier
    channels: it is rotated online by an orthonormal Hadamard matrix H, just before its
    quantizer, and out_proj's weight W (d_model, d) by the same H offline, so in float nothing
    changes,
        out = (y H) (W H)^T = y H H^T W^T = y W^T                      y (b, l, d)
    while the quantizer sees y H, each outlier spread over a Hadamard block
    (`qmamba.quant.hadamard`: block-diagonal where d is not a power of two).
Everything else is RTN: min-max static per-tensor activations, per-output-channel weights, and a
static per-tensor state (Quamba stores the SSM state per-tensor in int8). Without activation
quantization (W4A16) the rotation still applies: it is exact and spreads weight outlier columns
of out_proj too. Not included from Quamba(2): the rotated residual stream (Hadamard fused into
embedding, in_proj and lm_head).

Checkpoints: the rotation (a fast Walsh-Hadamard transform inside out_proj's input quantizer)
holds no tensor. A loader rebuilds the modules with `install_quantizers`, then
`install_rotations` (this method's `restore`), then `quantize_weights`, and assigns the saved
tensors; the saved weights are already rotated, so nothing is rotated again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import QMambaError
from ..quant.activation import ActQuantizer
from ..quant.apply import mixers
from ..quant.hadamard import Rotate
from ..quant.linear import QLinear
from .registry import METHODS, Method, register


def install_rotations(model) -> list[QLinear]:
    """Put a Hadamard `Rotate` in front of every out_proj's input quantizer, in place:
    input_quant becomes Sequential(rotate=Rotate(d), quant=<the input quantizer it had>).
    Only the modules: the weights are left as they are. Returns the out_projs changed (none
    where out_proj is still an nn.Linear, i.e. for an H-only config)."""
    changed = []
    for i, _, mixer in mixers(model):
        lin = getattr(mixer, "out_proj", None)            # layers without one are left as they are
        if not isinstance(lin, QLinear):
            continue
        if isinstance(lin.input_quant, nn.Sequential) and hasattr(lin.input_quant, "rotate"):
            raise ValueError(f"backbone.layers.{i}.mixer.out_proj is already rotated")
        lin.input_quant = nn.Sequential(OrderedDict(rotate=Rotate(lin.in_features), quant=lin.input_quant))
        changed.append(lin)
    return changed


@torch.no_grad()
def rotate_out_proj(model) -> None:
    """The float transform: install the rotations and rotate each out_proj's (still float)
    weight, W <- W H. Before any quantizer acts the model computes the same logits."""
    for lin in install_rotations(model):
        lin.weight.copy_(lin.input_quant.rotate(lin.weight))               # rows of W (d_model, d) times H


@dataclass(frozen=True)
class QuambaOptions:
    cli_prefix: ClassVar[str] = "quamba"
    cli_title: ClassVar[str] = "Quamba"
    percentile: float = field(default=99.999, metadata={
        "help": "percentile of |x| that sets the SSM input's static scale (default 99.999)", "metavar": "P"})

    def __post_init__(self):
        if not 0.0 < self.percentile <= 100.0:
            raise QMambaError(f"quamba percentile must be in (0, 100], got {self.percentile}")


@register
class Quamba(Method):
    """install quantizers (quant_x observes a percentile) -> rotate out_proj -> calibrate ->
    round the weights: the RTN steps with Quamba's two changes in between."""
    name = "quamba"
    description = ("Quamba: Hadamard-rotated out_proj input, percentile-clipped SSM input x, "
                   "otherwise RTN (min-max static per-tensor activations, per-channel weights)")
    options = QuambaOptions

    def observers(self, qcfg, opts: QuambaOptions) -> dict:
        return {"quant_x": "percentile"}

    def prepare(self, model, qcfg, opts: QuambaOptions) -> None:
        for _, _, mixer in mixers(model):
            if isinstance(getattr(mixer, "quant_x", None), ActQuantizer):
                mixer.quant_x.percentile = opts.percentile
        rotate_out_proj(model)

    def restore(self, model, qcfg, quantization_config: dict) -> None:
        """Rebuild the rotation modules only."""
        install_rotations(model)


quamba = METHODS["quamba"]
