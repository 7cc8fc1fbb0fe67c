"""The scan of a mixer whose SSM state is quantized: what `MixerBase.scan` hands to its state
quantizer (`StateQuantizer.scan`). Shapes: the letters of `qmamba.models.scan.reference`.

The state is re-quantized after every token, a non-linear recurrence with no parallel form. By
the quantizer's mode and what the pass is:

    off, no cache          the float parallel scan (the quantizer is switched off)
    observe, no cache      calibration: the parallel scan in segments of OBSERVE_EVERY tokens, the
                           quantizer observing the state carried between them
    training, ESR          the mixer's `state_sim` (ESR's differentiable simulation)
    quant, no gradient     the C kernel on the integer cache itself (where it runs), else the
                           fused per-token step (same numbers; with stochastic rounding only
                           without a cache: writing the final state into one would draw again and
                           shift the seeded stream that decoding continues)
    otherwise              the exact sequential recurrence (`selective_scan_ref`), the state passed
                           through the quantizer (or written into the cache) after every token

A pass over whole sequences (no cache) reseeds the quantizer first: the same noise every time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..models.cache import LayerState
from ..models.scan.reference import selective_scan_ref
from .qscan import kernel_scan, quantized_scan, use_cpu_kernel
from .state_cache import QuantizedSSMState

OBSERVE_EVERY = 16      # calibration observes the state after every 16th token


def quantized_state_scan(q, mixer, x: Tensor, dt: Tensor, B: Tensor, C: Tensor,
                         state: Optional[LayerState]) -> Tensor:
    """The scan of `mixer`'s native inputs x, dt, B, C with its state quantizer `q`; reads and
    updates `state` (a LayerState) if given. Returns y (b, l, d) in float32."""
    h0 = None if state is None else state.ssm.read()
    if q.mode == "off" and state is None:
        return mixer.parallel_scan(x, dt, B, C, h0)[0]
    if q.mode == "observe" and state is None:
        return mixer.segmented_scan(x, dt, B, C, None, OBSERVE_EVERY, q)[0]   # q observes, returns h
    if state is None:
        q.reseed()
    if mixer.state_sim is not None and mixer.training:
        return mixer.state_sim(mixer, x, dt, B, C, h0)[0]
    args = mixer.per_channel(x, dt, B, C)          # x, dt (b, l, d); A; B, C (b, l, g, n); D
    if q.mode == "quant" and not torch.is_grad_enabled():
        stored = None if state is None else state.ssm
        if use_cpu_kernel(q, x) and (stored is None or isinstance(stored, QuantizedSSMState)):
            xs, dts, A, Bs, Cs, D = args
            y = kernel_scan(stored if stored is not None else q.allocate(x.shape[0]), xs, dts, A, Bs, Cs)
            return y if D is None else y + D * xs.float()
        if state is None or q.rounding == "nearest":
            y, h = quantized_scan(*args, q, h0)
            if state is not None:
                state.ssm.write(h)                    # re-quantizing a stored state is exact
            return y
    return selective_scan_ref(*args, h0, q if state is None else state.ssm.write)[0]
