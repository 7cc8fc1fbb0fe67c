"""A written reference of mamba_ssm's Mamba / Mamba2 language models, the oracle of the parity
tests: plain PyTorch, float64 by default, every loop explicit, nothing shared with qmamba.

It follows the reference (non-fused) code paths of state-spaces/mamba (read at commit e9594ce):
  * mamba_ssm/models/mixer_seq_simple.py  MambaLMHeadModel / MixerModel: embedding, n_layer
        blocks, norm_f, lm_head (tied to the embedding when tie_embeddings);
  * mamba_ssm/modules/block.py  Block (fused_add_norm=False): residual = hidden + residual;
        hidden = mixer(RMSNorm(residual)) (in float64 the float32 residual changes nothing);
  * mamba_ssm/ops/triton/layer_norm.py  rms_norm_ref: x / sqrt(mean(x^2) + eps) * weight;
  * mamba_ssm/modules/mamba_simple.py  Mamba.forward (no fast path): in_proj -> x, z;
        x = silu(conv1d(x)[..., :l]) (depthwise, causal, d_conv - 1 zeros before);
        x_proj -> dt (dt_rank), B, C (d_state); dt = dt_proj.weight @ dt;
        selective_scan_ref(x, dt, A=-exp(A_log), B, C, D, z, delta_bias=dt_proj.bias,
        delta_softplus=True); out_proj;
  * mamba_ssm/ops/selective_scan_interface.py  selective_scan_ref: for t in 0..l-1:
        h = exp(dt_t A) h + dt_t x_t B_t;  y_t = <h, C_t> + D x_t;  out = y * silu(z);
        with B, C of shape (b, g, n, l): channel c reads group c // (d / g)
        (repeat "B G N L -> B (G H) N L");
  * mamba_ssm/modules/mamba2.py  Mamba2.forward (no fused kernel, d_mlp = 0): in_proj ->
        z (d), xBC (d + 2 g n), dt (h); xBC = silu(conv1d(xBC)) (one depthwise conv over x, B
        and C, in that channel order); x, B, C split, B and C "b l (g n) -> b l g n";
        dt = softplus(dt + dt_bias), clamped to dt_limit when it is not (0, inf)
        (ops/triton/ssd_combined.py ssd_selective_scan); A = -exp(A_log) per head; head i reads
        group i // (h / g) (ssd_selective_scan: repeat "h -> (h p) n", then selective_scan_ref);
        y = y + D x; y = RMSNormGated(y, z) with group_size = d_ssm // ngroups and
        norm_before_gate=False; out_proj;
  * mamba_ssm/ops/triton/layernorm_gated.py  rms_norm_ref(x, w, None, z, eps, group_size,
        norm_before_gate=False): x = x * silu(z); each group of group_size channels divided by
        its own sqrt(mean(x^2) + eps); times weight. Mamba2 builds it with eps=1e-5.
  * Falcon-Mamba (not in mamba_ssm; transformers' models/falcon_mamba/modeling_falcon_mamba.py,
        FalconMambaMixer): Mamba1 with a weight-less RMS norm (eps mixer_rms_eps) on dt, B and C
        right after x_proj, before dt_proj.

Weights are a state dict in transformers' or mamba_ssm's names (`backbone.embeddings` or
`backbone.embedding`, vocabulary possibly padded); hyper-parameters come from `Spec`, built from a transformers config
object (`spec_from_hf`) by the tests, never from qmamba's config parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Spec:
    arch: str                      # "mamba" | "falcon_mamba" | "mamba2"
    d_model: int
    n_layer: int
    d_inner: int
    d_state: int
    d_conv: int
    norm_eps: float = 1e-5         # block norms and norm_f
    # Mamba1 / Falcon-Mamba
    dt_rank: int = 0
    mixer_rms_eps: float = 1e-6
    # Mamba2
    headdim: int = 64
    ngroups: int = 1
    dt_limit: tuple = (0.0, math.inf)
    gated_norm_eps: float = 1e-5   # mamba_ssm's Mamba2 builds RMSNormGated(eps=1e-5)


def spec_from_hf(config) -> Spec:
    """A Spec from a transformers MambaConfig / FalconMambaConfig / Mamba2Config object."""
    c = config
    common = dict(d_model=c.hidden_size, n_layer=c.num_hidden_layers, d_state=c.state_size,
                  d_conv=c.conv_kernel, norm_eps=c.layer_norm_epsilon)
    if c.model_type == "mamba2":
        return Spec(arch="mamba2", d_inner=int(c.expand * c.hidden_size), headdim=c.head_dim,
                    ngroups=c.n_groups, dt_limit=tuple(float(v) for v in c.time_step_limit),
                    gated_norm_eps=c.layer_norm_epsilon, **common)
    return Spec(arch=c.model_type, d_inner=c.intermediate_size, dt_rank=c.time_step_rank,
                mixer_rms_eps=getattr(c, "mixer_rms_eps", 1e-6), **common)


# ------------------------------------------------------------------------------ pieces
def rms_norm_ref(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """layer_norm.py rms_norm_ref (weight None: the weight-less norm of Falcon-Mamba)."""
    out = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def gated_rms_norm_ref(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """layernorm_gated.py rms_norm_ref, norm_before_gate=False: gate, then per-group RMS norm."""
    x = x * F.silu(z)
    groups = x.unflatten(-1, (-1, group_size))                              # (..., g, d/g)
    groups = groups / torch.sqrt(groups.square().mean(-1, keepdim=True) + eps)
    return groups.flatten(-2) * weight


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (b, l, c); weight (c, 1, w): out_t = sum_k weight[:, k] x_{t-(w-1)+k} + bias, zeros
    before the first token (nn.Conv1d with padding w-1, truncated to l)."""
    b, length, c = x.shape
    w = weight.shape[-1]
    xp = torch.cat([x.new_zeros(b, w - 1, c), x], dim=1)
    out = torch.zeros_like(x)
    for k in range(w):
        out = out + weight[:, 0, k] * xp[:, k:k + length]
    return out if bias is None else out + bias


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                       z: Optional[Tensor] = None, state_fn=None) -> Tensor:
    """selective_scan_interface.py selective_scan_ref, sequential. u, delta (b, l, d) (delta
    already through bias and softplus); A (d, n); B, C (b, l, g, n), channel c reads group
    c // (d / g); D (d,). Returns (b, l, d). `state_fn` (not in mamba_ssm): applied to the state
    after every update (h = state_fn(h), e.g. a state quantizer), for quantized recurrences."""
    b, length, d = u.shape
    g, n = B.shape[-2:]
    per = d // g
    Bd = B.repeat_interleave(per, dim=2)                                    # (b, l, d, n)
    Cd = C.repeat_interleave(per, dim=2)
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bd[:, t]
        if state_fn is not None:
            h = state_fn(h)
        ys.append((h * Cd[:, t]).sum(-1))
    y = torch.stack(ys, dim=1) + u * D
    return y if z is None else y * F.silu(z)


def _linear(x: Tensor, sd: dict, name: str) -> Tensor:
    bias = sd.get(name + ".bias")
    y = x @ sd[name + ".weight"].T
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------ mixers
def mamba1_mixer(s: Spec, sd: dict, p: str, hidden: Tensor) -> Tensor:
    """mamba_simple.py Mamba.forward (+ Falcon-Mamba's dt/B/C norms)."""
    x, z = _linear(hidden, sd, p + "in_proj").split([s.d_inner, s.d_inner], dim=-1)
    x = F.silu(causal_depthwise_conv(x, sd[p + "conv1d.weight"], sd.get(p + "conv1d.bias")))
    dt, B, C = (x @ sd[p + "x_proj.weight"].T).split([s.dt_rank, s.d_state, s.d_state], dim=-1)
    if s.arch == "falcon_mamba":
        dt, B, C = (rms_norm_ref(t, None, s.mixer_rms_eps) for t in (dt, B, C))
    delta = F.softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"])
    A = -torch.exp(sd[p + "A_log"])                                         # (d, n)
    y = selective_scan_ref(x, delta, A, B[:, :, None], C[:, :, None], sd[p + "D"], z)
    return _linear(y, sd, p + "out_proj")


def mamba2_mixer(s: Spec, sd: dict, p: str, hidden: Tensor) -> Tensor:
    """mamba2.py Mamba2.forward, non-fused path, through ssd_selective_scan's per-channel form."""
    d, gn = s.d_inner, s.ngroups * s.d_state
    nheads = d // s.headdim
    z, xBC, dt = _linear(hidden, sd, p + "in_proj").split([d, d + 2 * gn, nheads], dim=-1)
    xBC = F.silu(causal_depthwise_conv(xBC, sd[p + "conv1d.weight"], sd.get(p + "conv1d.bias")))
    x, B, C = xBC.split([d, gn, gn], dim=-1)
    B, C = B.unflatten(-1, (s.ngroups, s.d_state)), C.unflatten(-1, (s.ngroups, s.d_state))
    dt = F.softplus(dt + sd[p + "dt_bias"])                                 # (b, l, h)
    if tuple(s.dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=s.dt_limit[0], max=s.dt_limit[1])
    # per head -> per channel ("h -> (h p)"): head i holds channels i*p .. i*p + p - 1, and its
    # group is i // (h / g), i.e. channel c reads group c // (d / g), as selective_scan_ref does
    delta = dt.repeat_interleave(s.headdim, dim=-1)
    A = (-torch.exp(sd[p + "A_log"])).repeat_interleave(s.headdim)[:, None].expand(d, s.d_state)
    D = sd[p + "D"].repeat_interleave(s.headdim)
    y = selective_scan_ref(x, delta, A, B, C, D)
    y = gated_rms_norm_ref(y, z, sd[p + "norm.weight"], s.gated_norm_eps, d // s.ngroups)
    return _linear(y, sd, p + "out_proj")


# ------------------------------------------------------------------------------ the LM
def lm_logits(spec: Spec, state_dict: dict, ids: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Logits (b, l, vocab) of MambaLMHeadModel(ids), computed in `dtype` (float64 default).
    The head is `lm_head.weight` where the state dict has one (tied checkpoints hold a copy of
    the embedding there), else the embedding."""
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v.detach().to(dtype)
          for k, v in state_dict.items() if v.is_floating_point()}
    emb = sd["backbone.embeddings.weight"]
    head = sd.get("lm_head.weight", emb)
    mixer = mamba2_mixer if spec.arch == "mamba2" else mamba1_mixer
    residual = emb[ids]                                                     # (b, l, d_model)
    for i in range(spec.n_layer):
        p = f"backbone.layers.{i}."
        residual = residual + mixer(spec, sd, p + "mixer.", rms_norm_ref(residual, sd[p + "norm.weight"],
                                                                        spec.norm_eps))
    return rms_norm_ref(residual, sd["backbone.norm_f.weight"], spec.norm_eps) @ head.T
