"""Causal self-attention of the hybrids (Nemotron-H, Granite-4.0-H): grouped-query attention,
RoPE or no position embedding (NoPE), the scale given by the config (head_dim^-1/2 for
Nemotron-H, `attention_multiplier` for Granite), keys and values kept in a `KVState`.

Shapes: b batch, l new tokens, t all tokens (cached + new), H query heads, K key/value heads
(H a multiple of K), e head_dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import QMambaError
from .cache import KVState
from .config import ModelConfig
from .layer_spec import LinearGroup, SmoothingPair, StateSpec


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionMixer(nn.Module):
    """q/k/v/o projections with transformers' names (`q_proj`, `k_proj`, `v_proj`, `o_proj`)."""
    LAYER_TYPE = "attention"
    QUANT_POINTS: tuple = ()
    LEARNABLE: dict = {}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hybrid
        self.n_heads, self.n_kv, self.head_dim = h["n_heads"], h["n_kv_heads"], h["head_dim"]
        if not self.n_heads or not self.n_kv or self.n_heads % self.n_kv:
            raise QMambaError(f"attention: {self.n_heads} heads are not a multiple of {self.n_kv} key/value heads")
        self.scale = h["attn_scale"] or self.head_dim ** -0.5
        self.rope_theta = h["rope_theta"]
        bias = h["attn_bias"]
        d, e = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * e, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * e, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * e, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * e, d, bias=bias)
        self.state_quant = None
        self.kv_quant = None        # set by qmamba.quant (a KV part of the config): owns the KV cache

    # ---- declarations (qmamba.models.layer_spec)
    def linear_groups(self) -> tuple[LinearGroup, ...]:
        return LinearGroup(("q_proj", "k_proj", "v_proj")), LinearGroup(("o_proj",))

    def smoothing_pairs(self) -> tuple[SmoothingPair, ...]:
        return (SmoothingPair("norm.weight", ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj")),)

    def states(self) -> tuple[StateSpec, ...]:
        return (StateSpec("kv", (2, self.n_kv, self.head_dim), headdim=self.head_dim, per_token=True),)

    def allocate_state(self, batch: int, dtype: torch.dtype, device) -> KVState:
        if self.kv_quant is not None:
            return self.kv_quant.allocate(batch, dtype, device)
        return KVState(batch, self.n_kv, self.head_dim, dtype, device)

    # ---- compute
    def _rope(self, x: Tensor, start: int) -> Tensor:
        """x (b, heads, l, e) at positions start.. start+l-1, as transformers' default RoPE."""
        if self.rope_theta is None:
            return x
        e = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, e, 2, dtype=torch.int64, device=x.device).float() / e))
        pos = torch.arange(start, start + x.shape[2], device=x.device).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _scores(self, q: Tensor, k: Tensor, rep: int) -> Tensor:
        """q (b, H, l, e), k (b, K, t, e) -> scaled scores (b, H, l, t)."""
        return torch.matmul(q, k.repeat_interleave(rep, dim=1).transpose(2, 3)) * self.scale

    def forward(self, hidden: Tensor, state: Optional[KVState] = None) -> Tensor:
        """hidden (b, l, d_model) -> (b, l, d_model); with `state`, attend to its tokens too and
        append these."""
        b, l, _ = hidden.shape
        start = 0 if state is None else state.length
        q = self.q_proj(hidden).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)   # (b, H, l, e)
        k = self.k_proj(hidden).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)      # (b, K, l, e)
        v = self.v_proj(hidden).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, start), self._rope(k, start)
        rep = self.n_heads // self.n_kv
        if self.kv_quant is not None:
            # quantized KV cache: query i reads key j quantized or in float (`quantized` (l, t)),
            # as the cache holds it when token i is decoded (qmamba.quant.kv)
            k_q, k_f, v, quantized = self.kv_quant.attend(k, v, state)
            scores = self._scores(q, k_q, rep)
            if not bool(quantized.all()):
                scores = torch.where(quantized, scores, self._scores(q, k_f, rep))
        else:
            if state is not None:
                k, v = state.append(k, v)                                                  # (b, K, t, e)
            scores = self._scores(q, k, rep)
        v = v.repeat_interleave(rep, dim=1)                                                # (b, H, t, e)
        t = v.shape[2]
        future = torch.ones(l, t, dtype=torch.bool, device=q.device).triu(t - l + 1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def step(self, hidden: Tensor, state: KVState) -> Tensor:
        """One token: hidden (b, d_model) -> (b, d_model)."""
        return self.forward(hidden[:, None], state)[:, 0]
