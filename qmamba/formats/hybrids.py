"""The hybrids' (Nemotron-H, Granite-4.0-H) part of a compressed-tensors folder: tensors, targets
and ignored modules under transformers' names (`qmamba.models.load.transformers_names`, the
inverse of `hybrid_weights`), and what the routed experts become (docs/checkpoint-format.md,
"Hybrids"):

  * Nemotron-H: per-expert linears (`mixer.experts.{i}.up_proj`), as its checkpoints hold them.
    transformers 5.x merges them into fused (experts, out, in) parameters while loading and
    dequantizes them only when they are pack-quantized (or fp8): quantized experts are written
    pack-quantized, weights only (the fused experts quantize no input), in one config group
    whose single target is EXPERT_TARGET;
  * Granite-4.0-H: fused (experts, out, in) `block_sparse_moe.input_linear` / `output_linear`,
    which no compressed-tensors scheme covers: written dequantized in float (codes * scales,
    what qmamba computes), ignored, with codes and scales in qmamba's extension.
The routers stay float. The KV part of a config has no kv_cache_scheme (vLLM accepts fp8 only,
transformers' compressed-tensors KV quantization is a static per-tensor/head scale): it stays in
qmamba's extension, and kv_cache_scheme is null."""

from __future__ import annotations

import re
from typing import Optional

from torch import Tensor

EXPERT = re.compile(r".+\.mixer\.experts\.\d+\.(up_proj|down_proj)")       # qmamba's names
EXPERT_TARGET = r"re:.*\.mixer\.experts\.\d+\.(up|down)_proj$"
# the routed experts as other loaders name them: transformers' checkpoint names (Nemotron-H's
# per-expert linears, Granite's fused input_linear/output_linear) and vLLM's RoutedExperts
EXPERT_IGNORE = {"nemotron_h": r"re:.*\.mixer\.experts(\.\d+\.(up|down)_proj)?$",
                 "granitemoehybrid": r"re:.*\.block_sparse_moe\.(experts|input_linear|output_linear)$"}


def hybrid_config(model):
    """The ModelConfig of a hybrid model, else None (Mamba models, a block holder)."""
    from ..models.config import HYBRID_MODEL_TYPES

    cfg = getattr(model, "config", None)
    return cfg if getattr(cfg, "model_type", None) in HYBRID_MODEL_TYPES else None


def float_expert(cfg, name: str, w_bits: Optional[int]) -> bool:
    """Whether linear `name` is a routed expert written in float (Granite's; Nemotron-H's when
    its weights are not quantized)."""
    return cfg is not None and EXPERT.fullmatch(name) is not None and (
        cfg.model_type != "nemotron_h" or w_bits is None)


def to_transformers(cfg, main: dict[str, Tensor], groups: dict, ignore: list, float_experts: bool):
    """(main tensors, scheme groups, ignored modules) under transformers' names."""
    from ..models.load import transformers_module, transformers_names

    main = transformers_names(cfg, main)
    groups = {scheme: [transformers_module(cfg, n) for n in names] for scheme, names in groups.items()}
    ignore = [transformers_module(cfg, n) for n in ignore] + ([EXPERT_IGNORE[cfg.model_type]] if float_experts else [])
    return main, groups, ignore


def from_transformers(cfg, main: dict[str, Tensor]) -> dict[str, Tensor]:
    """A folder's main tensors under qmamba's names."""
    from ..models.load import hybrid_weights

    return hybrid_weights(cfg, main)
