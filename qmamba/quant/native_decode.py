"""The whole decode step of a quantized Mamba2 model in one native call per token.

`qmamba.quant.execution.set_execution(model, "int")` installs `model_step` as the model's
`native_step`; `MambaLM.step` calls it with the token's embeddings and the cache, and it runs every
block (RMSNorm, in_proj, conv, SSM step on the integer state, gated RMSNorm, out_proj, residual)
in the C kernel `mamba2_model_step` (qmamba/kernels/cpu/int8_cpu.c): no Python and no PyTorch op
between the embedding lookup and the final norm. Its codes, scales, conv state and hidden states
equal the eager step's bit for bit (tests/kernels/test_native_decode.py); the eager step is its
reference twin (the kernel's own, pure-PyTorch twin is `qmamba.kernels.reference.mamba2_model_step`).

It applies (else it returns None and the model runs its per-layer step, fused where
`qmamba.quant.fused_decode` applies) when: every block is Mamba2, quantized with a static
per-tensor 8-bit quantizer at the conv input, x, B, C, dt and z, an int8 conv state and an
integer SSM state that the C kernels run; in_proj and out_proj hold 8-bit weight codes in integer
execution with an 8-bit input quantizer (static or dynamic, no rotation before it); the residual
has multiplier 1; float32 weights and activations on CPU, no gradient, eval mode; and the kernel is
available (`qmamba.kernels.forced("torch")` turns it off).

The per-model arguments (`Mamba2Layers`) are built once per model and cache (`_plan`).
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import torch
from torch import Tensor

from ..kernels import lookup as kernel_lookup
from ..kernels.mamba2_layer import Mamba2Layer, Mamba2Layers
from .fused_decode import _ACT_POINTS, _constants, _static8
from .intmm import _split_input_quant
from .linear import QLinear
from .qscan import use_cpu_kernel
from .state_cache import QuantizedSSMState

runs: collections.Counter = collections.Counter()      # tokens the native step ran (tests observe it)


def _linear(lin) -> Optional[tuple]:
    """in_proj / out_proj as the kernel's arguments (codes, row sums, scales, group size, bias,
    static scale, dynamic), or None where the kernel cannot run it."""
    pre, aq = _split_input_quant(getattr(lin, "input_quant", None))
    if (not isinstance(lin, QLinear) or lin.exec_mode != "int" or lin.w_bits != 8 or pre is not None
            or aq is None or aq.bits != 8 or aq.mode != "quant"):
        return None
    codes = lin.codes().contiguous()
    n, k = codes.shape
    gs = lin.group_size or k
    # row sums per group, 64 rows at a time: a whole int32 copy of the codes, freed at once,
    # would stay in the process's heap (4x the weight bytes of the largest layer, in the peak RSS)
    sums = torch.cat([c.view(-1, k // gs, gs).sum(-1, dtype=torch.int32) for c in codes.split(64)])
    bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
    return (codes, sums, lin.w_scale.detach().float().reshape(n, k // gs).contiguous(), gs, bias,
            0.0 if aq.dynamic else float(aq.scale), bool(aq.dynamic))


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def _layer(block, state) -> Optional[Mamba2Layer]:
    m = block.mixer
    if (getattr(m, "LAYER_TYPE", "") != "mamba2" or block.residual_multiplier != 1.0 or m.training
            or not isinstance(state.ssm, QuantizedSSMState) or state.conv.dtype != torch.int8
            or not state.conv.is_contiguous() or m.state_quant is None or m.state_quant.mode != "quant"
            or not use_cpu_kernel(m.state_quant, state.conv) or not _static8(m.quant_conv)
            or not all(_static8(getattr(m, p)) for p in _ACT_POINTS) or m.d_inner % m.norm.group_size
            or any(t.dtype != torch.float32 for t in (block.norm.weight, m.norm.weight, m.conv1d.weight, m.dt_bias))):
        return None
    lin_in, lin_out = _linear(m.in_proj), _linear(m.out_proj)
    if lin_in is None or lin_out is None:
        return None
    q, cache = m.state_quant, state.ssm
    s_conv, act, s_n, s_c = _constants(m)
    A, D = m.decode_constants()
    lo, hi = m.dt_limit if m.dt_limit != (0.0, math.inf) else (0.0, math.inf)
    w = m.conv1d.weight
    return Mamba2Layer(
        D=block.norm.weight.shape[0], d=m.d_inner, n=m.d_state, g=m.ngroups, headdim=m.headdim, w=w.shape[-1],
        norm_w=_f32(block.norm.weight), norm_eps=float(block.norm.eps),
        in_w=lin_in[0], in_sums=lin_in[1], in_sw=lin_in[2], in_gs=lin_in[3], in_bias=lin_in[4], in_sx=lin_in[5],
        in_dynamic=lin_in[6], dt_bias=_f32(m.dt_bias), dt_lo=float(lo), dt_hi=float(hi),
        s_conv=s_conv, sx=act[0], sB=act[1], sC=act[2], sdt=act[3], sz=act[4],
        conv_state=state.conv, conv_w=_f32(w.reshape(w.shape[0], w.shape[-1])),
        conv_b=None if m.conv1d.bias is None else _f32(m.conv1d.bias), A=_f32(A), Dskip=_f32(D),
        codes=cache.codes, scales=cache.scales, s_n=s_n, s_c=s_c, dynamic=q.scale_mode == "dynamic",
        per_byte=cache.per_byte, qmax=float(q.qmax), gnorm_w=_f32(m.norm.weight), group_size=m.norm.group_size,
        gnorm_eps=float(m.norm.eps),
        out_w=lin_out[0], out_sums=lin_out[1], out_sw=lin_out[2], out_gs=lin_out[3], out_bias=lin_out[4],
        out_sx=lin_out[5], out_dynamic=lin_out[6])


def _state_pointers(cache) -> tuple:
    return tuple(t.data_ptr() for s in cache for t in (s.conv, s.ssm.codes, s.ssm.scales))


def _plan(model, cache) -> Optional[Mamba2Layers]:
    """The kernel's arguments for this model and cache: built when the cache's tensors are new
    (a new cache, or one the eager path replaced), reused while they are the same and no
    parameter or buffer of the model changed in place (their version counters; a tensor
    swapped for another one between two tokens of one cache is not seen)."""
    if not all(isinstance(getattr(s, "ssm", None), QuantizedSSMState) for s in cache):
        return None                         # a float state, or an attention layer's KV cache
    state = _state_pointers(cache)
    hit = model.__dict__.get("_native_plan")
    if hit is not None and hit[0] == state and all(t._version == v for t, v in zip(hit[1], hit[2])):
        return hit[3]
    sources = [*model.parameters(), *model.buffers()]
    if any(torch.is_inference(t) for t in sources):
        sources, state = [], None           # no version counters: rebuilt for every token
    with torch.no_grad():
        layers = [_layer(block, s) for block, s in zip(model.backbone.layers, cache)]
    plan = None if any(layer is None for layer in layers) else Mamba2Layers(layers)
    model.__dict__["_native_plan"] = (state, sources, [t._version for t in sources], plan)
    return plan


def model_step(model, hidden: Tensor, cache) -> Optional[Tensor]:
    """The residual stream after every block for one token (hidden (b, d_model), the
    embeddings), the cache updated in place; None where the native step does not apply."""
    if (torch.is_grad_enabled() or hidden.device.type != "cpu" or hidden.dtype != torch.float32
            or not model.backbone.layers or model.training):
        return None
    kernel = kernel_lookup("mamba2_model_step", "cpu")
    if kernel is None or kernel_lookup("dsq_scan", "cpu") is None:
        return None
    plan = _plan(model, cache)
    if plan is None:
        return None
    runs["native"] += 1
    return kernel(plan, hidden.contiguous().clone())
