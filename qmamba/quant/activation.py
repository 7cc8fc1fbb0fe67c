"""Activation quantizers: static per-tensor scales from calibration (min-max or percentile
observers) or dynamic per-token scales, symmetric, fake-quantized (quantize -> dequantize) in the
simulated model. A quantizer is an nn.Module placed at one of the mixers' quantization points.

Modes: "observe" records statistics and passes x through unchanged (calibration), "quant"
quantizes, "off" passes through (e.g. to get full-precision targets).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import QMambaError
from .primitives import absmax, fake_quant, symmetric_scale

_QUANTILE_MAX = 1 << 24   # torch.quantile's input limit
_SAMPLE_PER_CALL = 1 << 18  # percentile observer: values kept from the first batch (same rate after)


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, dynamic: bool = False, observer: str = "minmax",
                 percentile: float = 99.99, where: str = ""):
        super().__init__()
        self.bits, self.dynamic, self.observer, self.percentile = bits, dynamic, observer, percentile
        self.where = where                      # module path, for error messages
        self.mode = "quant"
        # static per-tensor scale; a Parameter so that ESR can learn it (frozen by default)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.reset_stats()

    def extra_repr(self) -> str:
        kind = "dynamic per-token" if self.dynamic else f"static per-tensor ({self.observer})"
        return f"A{self.bits}, {kind}"

    # ------------------------------------------------------------ calibration
    def reset_stats(self):
        self._stats, self._amax, self._rate = [], 0.0, None

    @torch.no_grad()
    def observe(self, x: Tensor):
        if not torch.isfinite(x).all():
            raise QMambaError(f"non-finite activation (NaN or inf) at {self.where or 'an activation'} "
                              "during calibration; check the model and the calibration text")
        a = x.detach().abs().float().flatten()
        self._amax = max(self._amax, a.max().item())
        if self.observer == "percentile":
            # a uniform subsample at one fixed rate for the whole calibration, pooled, so the
            # percentile does not depend on how calibration is batched
            if self._rate is None:
                self._rate = min(1.0, _SAMPLE_PER_CALL / a.numel())
            if self._rate < 1.0:
                g = torch.Generator(device=a.device).manual_seed(len(self._stats))
                a = a[torch.rand(a.numel(), generator=g, device=a.device) < self._rate]
            self._stats.append(a.cpu())

    @torch.no_grad()
    def finish_calibration(self):
        """Static scale from the statistics: the max, or the percentile of the pooled sample."""
        if not self.dynamic:
            ref = self._amax
            if self._stats:
                pool = torch.cat(self._stats)
                if pool.numel() > _QUANTILE_MAX:
                    pool = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(0))[:_QUANTILE_MAX]]
                ref = torch.quantile(pool, self.percentile / 100).item()
            self.scale.fill_(symmetric_scale(torch.tensor(ref), self.bits).item())
        self.reset_stats()
        self.mode = "quant"

    # ------------------------------------------------------------ forward
    def current_scale(self, x: Tensor) -> Tensor:
        if self.dynamic:
            return symmetric_scale(absmax(x.detach(), -1), self.bits)     # (..., 1) per token
        return self.scale

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "off":
            return x
        return fake_quant(x.float(), self.current_scale(x).float(), self.bits).to(x.dtype)
