"""The feed-forward layer types of the hybrids: `mlp` (Nemotron-H's up/down with squared ReLU;
Granite-4.0-H's gated SwiGLU shared MLP where it has no experts) and `moe` (routed experts plus a
shared expert). They keep no state. The router stays in float; the experts are plain linears
(`experts.{i}.up_proj`, `experts.{i}.down_proj`), so quantizers can be installed on each.

A gated MLP's `up_proj` holds [gate; up] (2 * inner rows) and computes act(gate) * up, as
Granite's `input_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import QMambaError
from .cache import NoState
from .config import ModelConfig
from .layer_spec import LinearGroup, SmoothingPair, StateSpec

_ACT = {"relu2": lambda x: torch.square(F.relu(x)), "silu": F.silu}


class MLP(nn.Module):
    """down_proj(act(up_proj(x))), or down_proj(act(gate) * up) when gated."""

    def __init__(self, d_model: int, inner: int, act: str, gated: bool, bias: bool = False):
        super().__init__()
        self.gated, self.act = gated, _ACT[act]
        self.up_proj = nn.Linear(d_model, (2 if gated else 1) * inner, bias=bias)
        self.down_proj = nn.Linear(inner, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down_proj(h)


class _Stateless(nn.Module):
    QUANT_POINTS: tuple = ()
    LEARNABLE: dict = {}

    def states(self) -> tuple[StateSpec, ...]:
        return ()

    def allocate_state(self, batch: int, dtype: torch.dtype, device) -> NoState:
        return NoState()

    def step(self, hidden: Tensor, state=None) -> Tensor:
        return self.forward(hidden[:, None], state)[:, 0]


class MLPMixer(_Stateless):
    """An MLP layer: `mixer.up_proj`, `mixer.down_proj` as transformers' Nemotron-H names them."""
    LAYER_TYPE = "mlp"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hybrid
        mlp = MLP(cfg.d_model, h["mlp_inner"], h["mlp_act"], h["mlp_gated"], h["mlp_bias"])
        self.up_proj, self.down_proj = mlp.up_proj, mlp.down_proj
        self.gated, self.act = mlp.gated, mlp.act
        self.state_quant = None

    def linear_groups(self) -> tuple[LinearGroup, ...]:
        return LinearGroup(("up_proj",)), LinearGroup(("down_proj",))

    def smoothing_pairs(self) -> tuple[SmoothingPair, ...]:
        return (SmoothingPair("norm.weight", ("mixer.up_proj",)),)

    def forward(self, hidden: Tensor, state=None) -> Tensor:
        return MLP.forward(self, hidden)


class Router(nn.Module):
    """Top-k routing. "softmax" (Granite): softmax over the top-k logits (logits in the model's
    dtype, softmax in float32). "sigmoid"
    (Nemotron-H, DeepSeek-V3's): sigmoid scores, experts chosen among the best `topk_group` of
    `n_group` groups by score + e_score_correction_bias, weights the chosen scores (normalised
    if `norm_topk_prob`) times `routed_scaling`, all in float32 (the loader keeps this router's
    tensors in float32 at any dtype, as transformers does)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hybrid
        self.kind, self.top_k, self.n_experts = h["router"], h["top_k"], h["n_experts"]
        self.n_group, self.topk_group = h["n_group"], h["topk_group"]
        self.norm_topk_prob, self.routed_scaling = h["norm_topk_prob"], h["routed_scaling"]
        self.weight = nn.Parameter(torch.zeros(self.n_experts, cfg.d_model))
        if self.kind == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, d) -> weights (T, k) (float32; softmax: x's dtype), expert indices (T, k)."""
        if self.kind == "softmax":                                          # Granite: in the model's dtype
            top, idx = F.linear(x, self.weight.to(x.dtype)).float().topk(self.top_k, dim=-1)
            return torch.softmax(top, dim=-1).to(x.dtype), idx
        logits = F.linear(x.float(), self.weight.float())                  # (T, E)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        per = self.n_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per).topk(min(2, per), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per).reshape(-1, self.n_experts)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling, idx


class MoEMixer(_Stateless):
    """sum over the chosen experts of weight * expert(x), plus the shared expert (if any)."""
    LAYER_TYPE = "moe"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hybrid
        if h["n_experts"] <= 0 or not 0 < h["top_k"] <= h["n_experts"] or h["n_experts"] % h["n_group"]:
            raise QMambaError(f"moe: {h['n_experts']} experts, top {h['top_k']}, {h['n_group']} groups "
                              "is not a valid routing")
        act = h["mlp_act"]
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.d_model, h["expert_inner"], act, h["expert_gated"])
                                     for _ in range(h["n_experts"]))
        self.shared_experts = (MLP(cfg.d_model, h["shared_inner"], act, h["mlp_gated"])
                               if h["shared_inner"] else None)
        self.state_quant = None

    def linear_groups(self) -> tuple[LinearGroup, ...]:
        shared = () if self.shared_experts is None else ("shared_experts.up_proj",)
        ups = tuple(f"experts.{i}.up_proj" for i in range(len(self.experts))) + shared
        downs = tuple(LinearGroup((f"experts.{i}.down_proj",)) for i in range(len(self.experts)))
        tail = () if self.shared_experts is None else (LinearGroup(("shared_experts.down_proj",)),)
        return (LinearGroup(ups),) + downs + tail

    def smoothing_pairs(self) -> tuple[SmoothingPair, ...]:
        """The block norm feeds every expert's up_proj, the shared one's and the float router
        (whose weight takes the same scale, so the routing is unchanged)."""
        ups = tuple(f"mixer.{name}" for name in self.linear_groups()[0].linears)
        return (SmoothingPair("norm.weight", ups + ("mixer.gate",)),)

    def forward(self, hidden: Tensor, state=None) -> Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])                                   # (T, d)
        weights, idx = self.gate(x)                                         # (T, k)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            token, slot = torch.where(idx == e)
            y = self.experts[e](x[token]) * weights[token, slot, None]     # sigmoid: in float32
            out.index_add_(0, token, y.to(out.dtype))
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out
