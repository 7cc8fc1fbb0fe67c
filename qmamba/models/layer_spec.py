"""What a layer type declares about itself: the data that quantization methods, the memory
report and `inspect` read instead of asking which architecture a model is.

A model is a list of residual blocks, `residual + mixer(norm(residual))`, one layer type per
block (`ModelConfig.layer_types`). The mixer class of a layer type (registered in
`qmamba.models.layer_types`) declares:

    LAYER_TYPE        its name in `ModelConfig.layer_types`
    QUANT_POINTS      attributes holding activation quantization points (nn.Identity until
                      `qmamba.quant` installs quantizers there)
    linear_groups()   its quantizable linears, grouped by the input they read (one activation
                      quantizer serves a group: the linears of a group read the same tensor)
    smoothing_pairs() producer -> linears pairs where a per-input-channel scale folds exactly
                      into the producer (SmoothQuant); paths relative to the block
    states()          the recurrent state it keeps per sequence (conv, SSM; the KV cache per token)
    LEARNABLE         optional float parameters a reconstruction may train (e.g. the dt bias),
                      by option name

Paths are attribute paths ("in_proj", "norm.weight", "mixer.x_proj.weight").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears (paths relative to the mixer) that read one input. Each gets a quantized linear;
    one input quantizer serves the group, unless `input_quantized` (the input is already the
    output of an activation quantization point, e.g. Mamba1's x_proj reads quant_x's output)."""
    linears: tuple[str, ...]
    input_quantized: bool = False


@dataclass(frozen=True)
class SmoothingPair:
    """`producer` (a parameter path relative to the block) makes channel j of the input of
    `linears` (paths relative to the block) with its row j along dim 0 (only rows
    `rows[0]:rows[1]` when given), and nothing else: a scale 1/s_j folds into that row exactly."""
    producer: str
    linears: tuple[str, ...]
    rows: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state a layer keeps for each sequence. kind: "conv" | "ssm" | "kv"; shape:
    per sequence, or per token of context where `per_token` (the keys and values of attention:
    (2, kv_heads, head_dim)); headdim: channels that share one head (the SSM state of Mamba2)."""
    kind: str
    shape: tuple[int, ...]
    headdim: int = 1
    per_token: bool = False

    @property
    def numel(self) -> int:
        """Elements per sequence; 0 for a state that grows with the context (`per_token`)."""
        return 0 if self.per_token else math.prod(self.shape)


def get_path(root: nn.Module, path: str):
    """The attribute at a dotted path ("mixer.norm.weight")."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value) -> None:
    head, _, last = path.rpartition(".")
    setattr(get_path(root, head) if head else root, last, value)


def producer_view(block: nn.Module, pair: SmoothingPair) -> Tensor:
    """The producer rows of a smoothing pair, as a view of its (detached) weight."""
    w = get_path(block, pair.producer).detach()
    return w if pair.rows is None else w[pair.rows[0]:pair.rows[1]]


def quantizable_linears(mixer: nn.Module) -> tuple[str, ...]:
    """Every quantizable linear of a mixer, in declaration order."""
    return tuple(name for group in mixer.linear_groups() for name in group.linears)


def state_spec(mixer: nn.Module, kind: str) -> Optional[StateSpec]:
    return next((s for s in mixer.states() if s.kind == kind), None)
