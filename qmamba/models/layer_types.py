"""The layer types a model is built from, by the names `ModelConfig.layer_types` lists.

To add one (an attention, MLP or MoE layer of a hybrid), write its module with the declarations
of `qmamba.models.layer_spec` and register its class here: the block, the quantization methods,
ESR, `inspect` and the memory report read those declarations.
"""

from __future__ import annotations

from torch import nn

from ..errors import QMambaError
from .attention import AttentionMixer
from .config import ModelConfig
from .feedforward import MLPMixer, MoEMixer
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer

LAYER_TYPES: dict[str, type[nn.Module]] = {
    cls.LAYER_TYPE: cls for cls in (Mamba1Mixer, Mamba2Mixer, AttentionMixer, MLPMixer, MoEMixer)}


def build_mixer(cfg: ModelConfig, layer_type: str) -> nn.Module:
    """The mixer of one block."""
    cls = LAYER_TYPES.get(layer_type)
    if cls is None:
        raise QMambaError(f"unknown layer type {layer_type!r}; known: {', '.join(LAYER_TYPES)}")
    return cls(cfg)
