"""Mamba2's quantized decode step through the fused C kernels of `qmamba.kernels`.

The eager step (`Mamba2Mixer.step` on the quantized model, integer execution) runs some forty
small PyTorch ops per layer between its C kernels. Here two native calls replace most of them:

    mamba2_conv_step   quant_conv, the int8 conv state's read, the depthwise conv and bias, and
                       the conv state's write (in place)
    mamba2_ssm_step    quant_x, quant_B, quant_C, quant_dt, one token of `dsq_scan` on the
                       integer SSM state (in place), D x and quant_z

Between and around them stay the ops whose float results the C code cannot reproduce bit for bit:
the SiLU of the conv output and the softplus of dt (PyTorch's vectorised exp / log1p), the block's
RMSNorm and the gated RMSNorm (PyTorch's reduction order, which depends on its CPU capability),
and the in_proj / out_proj products (already C kernels). Every output (codes, fp16 scales, conv
state, hidden states) equals the eager step's bit for bit (tests/kernels/test_fused_decode.py).

`fused_step` returns None where the configuration is not the supported one (then the mixer runs
its eager step): the model must be in integer or simulated execution with static per-tensor 8-bit
quantizers at quant_conv, quant_x, quant_B, quant_C, quant_dt and quant_z, an int8 conv state, an
integer SSM state the C `dsq_scan` runs (round to nearest), float32 on CPU, no gradient, and both
kernels available (`qmamba.kernels.forced("torch")` turns them off). Mamba1 keeps its eager step.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import Tensor

from ..kernels import lookup as kernel_lookup
from .activation import ActQuantizer
from .qscan import _kernel_scales, runs as scan_runs, use_cpu_kernel
from .state_cache import QuantizedSSMState

runs: collections.Counter = collections.Counter()      # fused layer steps taken (tests observe it)
_ACT_POINTS = ("quant_x", "quant_B", "quant_C", "quant_dt", "quant_z")


def _static8(q) -> bool:
    return isinstance(q, ActQuantizer) and q.mode == "quant" and not q.dynamic and q.bits == 8


def _supported(mixer, hidden: Tensor, state) -> bool:
    q = mixer.state_quant
    return (not torch.is_grad_enabled() and not mixer.training and hidden.device.type == "cpu"
            and hidden.dtype == torch.float32 and getattr(mixer, "LAYER_TYPE", "") == "mamba2"
            and isinstance(state.ssm, QuantizedSSMState) and q is not None and q.mode == "quant"
            and state.conv.dtype == torch.int8 and _static8(mixer.quant_conv)
            and all(_static8(getattr(mixer, p)) for p in _ACT_POINTS)
            and mixer.conv1d.weight.dtype == torch.float32 and use_cpu_kernel(q, hidden))


def _constants(mixer) -> tuple:
    """The conv input scale, the scales of quant_x, quant_B, quant_C, quant_dt and quant_z (Python
    floats) and the state's kernel scales s_n, s_c: recomputed only when one of the tensors they
    come from changes (as `decode_constants`; always for inference tensors, which have no version)."""
    q = mixer.state_quant
    params = [mixer.quant_conv.scale, *(getattr(mixer, p).scale for p in _ACT_POINTS), q.static_scale, q.s_n]
    if any(torch.is_inference(t) for t in params):
        key = None
    else:
        key = tuple((t._version, t.data_ptr()) for t in params)
    cached = mixer.__dict__.get("_fused_consts")
    if key is None or cached is None or cached[0] != key:
        with torch.no_grad():
            s_n, s_c = _kernel_scales(q)
            cached = (key, (float(params[0]), tuple(float(t) for t in params[1:6]), s_n.float().contiguous(),
                            s_c.float().contiguous()))
        mixer.__dict__["_fused_consts"] = cached
    return cached[1]


def fused_step(mixer, hidden: Tensor, state) -> Optional[Tensor]:
    """`mixer.step(hidden, state)` of a quantized Mamba2 mixer with the fused kernels, or None
    where they do not apply. hidden (b, d_model) -> (b, d_model); updates `state` in place."""
    if not _supported(mixer, hidden, state):
        return None
    conv = kernel_lookup("mamba2_conv_step", "cpu")
    ssm = kernel_lookup("mamba2_ssm_step", "cpu")
    if conv is None or ssm is None:
        return None
    z, xBC, dt = mixer._split(mixer.in_proj(hidden))
    dt = mixer.softplus(dt + mixer.dt_bias.to(dt.dtype))
    if mixer.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*mixer.dt_limit)
    A, D = mixer.decode_constants()
    q, cache = mixer.state_quant, state.ssm
    s_conv, act, s_n, s_c = _constants(mixer)
    xBC = mixer.silu(conv(xBC, s_conv, state.conv, mixer.conv1d.weight, mixer.conv1d.bias))
    y, zq = ssm(xBC, dt, z, act, A, D, cache.codes, cache.scales, s_n, s_c, q.scale_mode == "dynamic",
                cache.per_byte, float(q.qmax), mixer.headdim, mixer.ngroups)
    scan_runs["kernel"] += 1
    runs["fused"] += 1
    return mixer.out_proj(mixer.norm(y, zq))
