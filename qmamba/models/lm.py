"""The causal language model around either mixer: embedding, pre-norm residual blocks, final
norm and (tied or untied) lm_head, with module names that match transformers' checkpoints
(`backbone.embeddings`, `backbone.layers.{i}.norm|mixer`, `backbone.norm_f`, `lm_head`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .cache import InferenceCache
from .config import ModelConfig
from .layer_types import build_mixer
from .layers import RMSNorm


@dataclass
class QuantState:
    """How a quantized model was made: what `qmamba.quantize` and the checkpoint loader record on
    `MambaLM.quant_state` (None for a float model)."""
    config: Any                      # the qmamba.quant.config.QuantConfig
    method: str                      # the method's registry name
    seconds: Optional[float] = None  # quantization time (None: loaded from a checkpoint)
    records: Optional[list] = None   # the reconstruction's per-block records (ESR), if any
    meta: dict = field(default_factory=dict)   # extra fields written into quantization_config


class Block(nn.Module):
    """residual + mixer(norm(residual)), the residual stream kept in float32 if asked; the
    mixer is the one of the block's layer type (`qmamba.models.layer_types`)."""

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(cfg, layer_type)
        # Granite-4.0-H: residual + residual_multiplier * mixer(norm(residual))
        self.residual_multiplier = float(cfg.hybrid.get("residual_multiplier", 1.0))

    def _residual(self, hidden: Tensor) -> Tensor:
        return hidden.float() if self.residual_in_fp32 else hidden

    def _add(self, hidden: Tensor, out: Tensor) -> Tensor:
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return self._residual(hidden) + out

    def forward(self, hidden: Tensor, state=None) -> Tensor:
        out = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), state)
        return self._add(hidden, out)

    def step(self, hidden: Tensor, state) -> Tensor:
        out = self.mixer.step(self.norm(hidden.to(self.norm.weight.dtype)), state)
        return self._add(hidden, out)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class MambaLM(nn.Module):
    """Mamba / Mamba2 / hybrid causal LM (one layer type per block: `cfg.layer_types`). `forward` is the parallel path (prompts, training, evaluation),
    `step` the recurrent one (decoding), both through an optional `InferenceCache`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.quant_state: Optional[QuantState] = None
        # every block of a decode step in one call, the same numbers as the loop over `Block.step`
        # (set by `qmamba.quant.execution.set_execution`; returns None where it does not apply)
        self.native_step: Optional[Callable] = None
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def quant_config(self):
        """The QuantConfig of a quantized model, None for a float one."""
        return None if self.quant_state is None else self.quant_state.config

    @property
    def quant_method(self) -> Optional[str]:
        return None if self.quant_state is None else self.quant_state.method

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def mixers(self):
        return [layer.mixer for layer in self.backbone.layers]

    def embed(self, input_ids: Tensor) -> Tensor:
        """The input of the first block: the embeddings (times Granite's embedding_multiplier)."""
        hidden = self.backbone.embeddings(input_ids)
        mult = self.config.hybrid.get("embedding_multiplier", 1.0)
        return hidden * mult if mult != 1.0 else hidden

    def _head(self, hidden: Tensor) -> Tensor:
        hidden = self.backbone.norm_f(hidden.to(self.backbone.norm_f.weight.dtype))
        logits = self.lm_head(hidden)
        scaling = self.config.hybrid.get("logits_scaling", 1.0)     # Granite divides the logits
        return (logits / scaling if scaling != 1.0 else logits).float()

    def forward(self, input_ids: Tensor, cache: Optional[InferenceCache] = None,
                return_hidden: bool = False, logits_to_keep: int = 0) -> Tensor:
        """input_ids (b, l) -> logits (b, l, vocab) in float32. A cache is read and advanced.
        `logits_to_keep` > 0 computes only the last that many positions' logits (a prompt
        before generation needs one), as transformers' argument of that name does."""
        hidden = self.embed(input_ids)                                     # (b, l, d_model)
        for i, layer in enumerate(self.backbone.layers):
            hidden = layer(hidden, None if cache is None else cache[i])
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        if return_hidden:
            return hidden
        return self._head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: InferenceCache) -> Tensor:
        """One token per sequence. input_ids (b,) or (b, 1) -> logits (b, vocab) in float32."""
        hidden = self.embed(input_ids.reshape(-1))                         # (b, d_model)
        out = None if self.native_step is None else self.native_step(self, hidden, cache)
        if out is not None:
            hidden = out
        else:
            for i, layer in enumerate(self.backbone.layers):
                hidden = layer.step(hidden, cache[i])
        cache.seqlen += 1
        return self._head(hidden)

    def allocate_cache(self, batch: int, device=None, dtype=None) -> InferenceCache:
        # the native step's arguments point into the last cache: let it go with its owner
        self.__dict__.pop("_native_plan", None)
        p = self.backbone.norm_f.weight
        device = device or p.device
        dtype = dtype or p.dtype
        return InferenceCache([m.allocate_state(batch, dtype, device) for m in self.mixers()])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_weights(model: MambaLM, seed: int = 0, dt_min: float = 1e-3, dt_max: float = 1e-1) -> MambaLM:
    """The initialisation of mamba_ssm (S4D-real A, dt bias from a log-uniform dt, D = 1, linear
    and embedding normal(0.02), out_proj rescaled by 1/sqrt(n_layer)) for training from scratch;
    a hybrid's attention, MLP and MoE layers get the normal(0.02) linears and unit norms only."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or name.endswith("dt_proj.bias"):
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for layer in model.layers:
            m = layer.mixer
            if not hasattr(m, "init_dynamics_"):       # attention / MLP / MoE layers of a hybrid
                continue
            m.out_proj.weight.div_(math.sqrt(cfg.n_layer))
            nh = m.A_log.shape[0]
            dt = torch.exp(torch.rand(nh, generator=g) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            inv_softplus = dt + torch.log(-torch.expm1(-dt))
            m.init_dynamics_(g, inv_softplus)
            m.D.fill_(1.0)
            if m.conv1d.bias is not None:
                m.conv1d.bias.zero_()
            bound = 1 / math.sqrt(m.conv1d.weight.shape[-1])
            m.conv1d.weight.copy_((torch.rand(m.conv1d.weight.shape, generator=g) * 2 - 1) * bound)
    return model
