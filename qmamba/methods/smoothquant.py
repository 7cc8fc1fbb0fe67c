"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", ICML 2023): move the quantization difficulty of activations with
outlier channels into the weights by one scale per input channel, then round as RTN does.

For a linear out = x W^T with input x (..., k) and weight W (out, k), per input channel j:

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)        alpha: migration strength (0.5)
    out = (x / s) (W * s)^T                                  the same function, in float

so a channel that is large in x is shrunk there and enlarged in W, where the per-output-channel
weight scales absorb it. The 1/s is folded into the op that produces x, and only where that is
exact (the producer's weight scales channel j of x and nothing else); each layer type declares
these pairs (`smoothing_pairs()` of its mixer, `qmamba.models.layer_spec`). Linears that read
one input (e.g. q, k, v) share one s, from the maxima of all their weights. For Mamba:

    linear           its input x                       1/s folded into
    in_proj          the block's RMSNorm output        the RMSNorm weight
    out_proj (M2)    the gated RMSNorm output          the gated RMSNorm weight (it scales
                                                       after the per-group normalisation)
    dt_proj (M1)     the dt rows of x_proj's output    those rows of x_proj's weight, whose
                                                       per-output-channel scales absorb it

Left unsmoothed, since no exactly foldable op produces their input: Mamba1's x_proj (input
silu(conv(x)), which is also the scan input x), Mamba1's out_proj (input y * silu(z), y from the
scan), and Falcon-Mamba's dt_proj (a weight-less RMS norm of dt sits between it and x_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import QMambaError
from ..models.layer_spec import get_path, producer_view
from ..quant.primitives import EPS
from .registry import METHODS, Method, register

SCALE_RANGE = (1e-3, 1e3)   # s beyond this would blow the producer's weight up (or down) by > 1000x


def smoothing_pairs(model) -> list[tuple[tuple[nn.Linear, ...], Tensor]]:
    """(linears, producer) for every smoothing pair the layers declare (`smoothing_pairs()` of
    each mixer; see the module docstring). The linears read one input; the producer is a view of
    the weight that makes it: its row j (dim 0) makes input channel j."""
    pairs = []
    for layer in model.backbone.layers:
        for pair in layer.mixer.smoothing_pairs():
            pairs.append((tuple(get_path(layer, name) for name in pair.linears), producer_view(layer, pair)))
    return pairs


@torch.no_grad()
def input_absmax(model, linears: list[nn.Linear], calib: Tensor, batch_size: int = 16,
                 progress: bool = False) -> list[Tensor]:
    """max |x_j| per input channel (k,) of each linear, over the calibration ids calib (N, L)
    run through the model as it is (forward pre-hooks on the linears)."""
    amax = [torch.zeros(lin.in_features, device=lin.weight.device) for lin in linears]

    def hook(i):
        def record(_module, args):
            x = args[0].detach().abs().float().flatten(0, -2)              # (b * l, k)
            amax[i] = torch.maximum(amax[i], x.amax(0))
        return record

    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(linears)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(calib), batch_size), desc="smoothquant maxima", unit="batch",
                          disable=not progress, leave=False):
            model(calib[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return amax


def smoothing_scale(x_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """s (k,) = max|x_j|^alpha / max_i |W_ij|^(1 - alpha), clamped to SCALE_RANGE; 1 for a
    channel never seen active or with an all-zero weight column. x_absmax (k,); weight (out, k)."""
    w_absmax = weight.detach().abs().float().amax(0)                       # (k,)
    s = x_absmax.clamp(min=EPS).pow(alpha) / w_absmax.clamp(min=EPS).pow(1 - alpha)
    live = (x_absmax > 0) & (w_absmax > 0)
    return torch.where(live, s.clamp(*SCALE_RANGE), torch.ones_like(s))


@torch.no_grad()
def smooth(model, calib: Tensor, alpha: float = 0.5, progress: bool = False) -> list[Tensor]:
    """The float transform: calibrate the input maxima, then W <- W * s and producer <- producer / s
    for every pair of `smoothing_pairs`. The float model computes the same logits. Returns the s."""
    if not 0.0 <= alpha <= 1.0:
        raise QMambaError(f"smoothquant alpha (migration strength) must be in [0, 1], got {alpha}")
    pairs = smoothing_pairs(model)
    maxima = input_absmax(model, [lins[0] for lins, _ in pairs], calib, progress=progress)
    scales = []
    for (lins, producer), x_absmax in zip(pairs, maxima):
        weight = lins[0].weight if len(lins) == 1 else torch.cat([lin.weight for lin in lins])
        s = smoothing_scale(x_absmax, weight, alpha)
        for lin in lins:
            lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
        row = s.view(-1, *[1] * (producer.dim() - 1))
        producer.copy_((producer.float() / row).to(producer.dtype))
        scales.append(s)
    return scales


@dataclass(frozen=True)
class SmoothQuantOptions:
    cli_prefix: ClassVar[str] = "smoothquant"
    cli_title: ClassVar[str] = "SmoothQuant"
    alpha: float = field(default=0.5, metadata={"help": "migration strength in [0, 1] (default 0.5)", "metavar": "A"})

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise QMambaError(f"smoothquant alpha (migration strength) must be in [0, 1], got {self.alpha}")


@register
class SmoothQuant(Method):
    """Smooth the float model (only when activations are quantized: with A16 there is nothing to
    migrate), then install, calibrate and round as RTN."""
    name = "smoothquant"
    description = ("SmoothQuant (alpha=0.5) on in_proj, Mamba2 out_proj and Mamba1 dt_proj, "
                   "then RTN: min-max static per-tensor activations, per-channel weights")
    options = SmoothQuantOptions

    def transform(self, model, qcfg, calib, opts: SmoothQuantOptions, progress: bool) -> None:
        if qcfg.a_bits is not None:
            smooth(model, calib, opts.alpha, progress=progress)


smoothquant = METHODS["smoothquant"]
