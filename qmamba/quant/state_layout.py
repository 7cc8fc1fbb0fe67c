"""How each state-quantizer kind shares its scale: one `StateLayout` subclass per kind, registered
in `LAYOUTS` under the kind's name (the names `QuantConfig.state_quant` takes). Shapes use the
glossary of `qmamba.models.scan.reference`: the state is h (b, d, n).

A layout owns everything that depends on the kind:

    split / merge     (b, d, n) <-> the view its scale broadcasts against, a pure reshape
                      (head: (b, h, p, n); group: (b, d, n/gs, gs); others: (b, d, n))
    view / unview     the state <-> the view that is rounded: split, and for DSQ divided by the
                      state-axis scale s_n (unview multiplies it back)
    reduce_dims       the dims of the view (batch is 0) that share one scale
    static_shape      the static scale's shape: the view's, reduced dims of size 1 (without batch)
    dynamic_shape     the per-write scales stored for a batch: (batch, *static_shape)
    uses_s_n          whether s_n divides the state (DSQ): calibrated, and learned by ESR
    kernel_modes      the scale modes the C kernel runs: those where the scale of h[c, j] is
                      s_n[j] * s_c[c] (and, dynamic, s_c is the amax of h / s_n over the state axis)
    kernel_scales     that split of the scales: s_n (n,) and s_c (d, 1)

`StateQuantizer` (the fake quantizer, calibration), `QuantizedSSMState` (the integer cache), the
fused token steps of `qmamba.quant.qscan` and its C kernel adapter ask the layout; a new kind is
one `@register`ed subclass here. The engine reference `qmamba.formats.state_extension` spells
the kinds out on its own (docs/checkpoint-format.md quotes it).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..errors import QMambaError

LAYOUTS: dict[str, type["StateLayout"]] = {}


def register(cls: type["StateLayout"]) -> type["StateLayout"]:
    """Class decorator: the layout becomes the state quantizer named `cls.name`."""
    if cls.name in LAYOUTS:
        raise ValueError(f"state quantizer {cls.name!r} registered twice")
    LAYOUTS[cls.name] = cls
    return cls


def make_layout(kind: str, d: int, n: int, headdim: int = 1, group_size: int = 8) -> "StateLayout":
    """The layout of state quantizer `kind` for a (b, d, n) state (`headdim` channels per head,
    `group_size` state indices per group: each kind takes what it uses)."""
    if kind not in LAYOUTS:
        raise QMambaError(f"unknown state quantizer {kind!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[kind](d, n, headdim=headdim, group_size=group_size)


def fp16_scale(s: Tensor) -> Tensor:
    """Round a dynamic scale to what float16 storage keeps (never to zero, never to inf)."""
    return s.clamp(2.0 ** -24, 65504.0).half().float()


class StateLayout:
    """The scale layout of one kind for a (b, d, n) state; the base class is a (b, d, n) view with
    no s_n. Layouts compare equal when they compute the same (`key`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reduce_dims: ClassVar[tuple] = ()
    uses_s_n: ClassVar[bool] = False
    kernel_modes: ClassVar[frozenset] = frozenset()
    headdim: int = 1                      # channels per scale along d (HeadLayout: p)

    def __init__(self, d: int, n: int, headdim: int = 1, group_size: int = 8):
        self.d, self.n = d, n

    @property
    def key(self) -> tuple:
        """What the layout's computation depends on (compiled steps are cached by it)."""
        return (self.name, self.d, self.n)

    def __eq__(self, other) -> bool:
        return isinstance(other, StateLayout) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key[1:]}"

    # ------------------------------------------------------------------ views
    def split(self, t: Tensor) -> Tensor:
        """(b, d, n) -> the view the scale broadcasts against (a reshape, element order kept)."""
        return t

    def merge(self, v: Tensor) -> Tensor:
        """The inverse of `split`."""
        return v

    def view(self, h: Tensor, s_n: Tensor) -> Tensor:
        """The state h (b, d, n) as it is rounded (s_n: the quantizer's state-axis scale)."""
        return self.split(h)

    def unview(self, v: Tensor, s_n: Tensor) -> Tensor:
        """The inverse of `view`: codes x scale back to the state (b, d, n)."""
        return self.merge(v)

    # ------------------------------------------------------------------ scales
    def static_shape(self) -> tuple:
        shape = list(self.split(torch.empty(1, self.d, self.n, device="meta")).shape[1:])
        for dim in self.reduce_dims:
            shape[dim - 1] = 1
        return tuple(shape)

    def dynamic_shape(self, batch: int) -> tuple:
        return (batch, *self.static_shape())

    def dynamic_scale(self, v: Tensor, qmax) -> Tensor:
        """The per-write scale of the viewed state v, rounded to float16 as stored."""
        return fp16_scale(v.abs().amax(dim=self.reduce_dims, keepdim=True) / qmax)

    def kernel_scales(self, static: Tensor, s_n: Tensor) -> tuple[Tensor, Tensor]:
        """The static scale (clamped) and s_n as the C kernel's state-axis s_n (n,) and channel
        s_c (d, 1): round(h / s_n / s_c) is exactly the layout's own rounding (dividing by 1 is
        exact). Only for the modes in `kernel_modes`."""
        raise QMambaError(f"the C kernel does not run the {self.name!r} state quantizer")

    def _ones_n(self, like: Tensor) -> Tensor:
        return torch.ones(self.n, device=like.device)

    def _ones_d(self, like: Tensor) -> Tensor:
        return torch.ones(self.d, 1, device=like.device)


@register
class TensorLayout(StateLayout):
    name = "tensor"
    description = "one scale for the whole state of a layer"
    reduce_dims = (1, 2)
    kernel_modes = frozenset({"static"})

    def kernel_scales(self, static, s_n):
        return self._ones_n(static), static.reshape(1, 1).expand(self.d, 1)


@register
class ChannelLayout(StateLayout):
    name = "channel"
    description = "one scale per channel (row d), over the state axis"
    reduce_dims = (2,)
    kernel_modes = frozenset({"static", "dynamic"})

    def kernel_scales(self, static, s_n):
        return self._ones_n(static), static


@register
class StateIndexLayout(StateLayout):
    name = "state"
    description = "one scale per state index (column n), over the channels"
    reduce_dims = (1,)
    kernel_modes = frozenset({"static"})

    def kernel_scales(self, static, s_n):
        return static.reshape(self.n), self._ones_d(static)


@register
class HeadLayout(StateLayout):
    name = "head"
    description = "one scale per head (Mamba2; p channels x n states); Mamba1: same as channel"
    reduce_dims = (2, 3)
    kernel_modes = frozenset({"static"})

    def __init__(self, d: int, n: int, headdim: int = 1, group_size: int = 8):
        if d % headdim:
            raise QMambaError(f"head dim {headdim} does not divide {d} channels")
        super().__init__(d, n)
        self.headdim = headdim

    @property
    def key(self) -> tuple:
        return (self.name, self.d, self.n, self.headdim)

    def split(self, t):
        return t.unflatten(1, (t.shape[1] // self.headdim, self.headdim))     # (b, h, p, n)

    def merge(self, v):
        return v.flatten(1, 2)

    def kernel_scales(self, static, s_n):
        return self._ones_n(static), static.reshape(-1, 1).repeat_interleave(self.headdim, dim=0)


@register
class GroupLayout(StateLayout):
    name = "group"
    description = "one scale per channel and group of `state_group_size` state indices"
    reduce_dims = (3,)

    def __init__(self, d: int, n: int, headdim: int = 1, group_size: int = 8):
        if n % group_size:
            raise QMambaError(f"state group size {group_size} does not divide d_state {n}")
        super().__init__(d, n)
        self.group_size = group_size

    @property
    def key(self) -> tuple:
        return (self.name, self.d, self.n, self.group_size)

    def split(self, t):
        return t.unflatten(2, (t.shape[2] // self.group_size, self.group_size))   # (b, d, n/gs, gs)

    def merge(self, v):
        return v.flatten(2, 3)


@register
class DSQLayout(StateLayout):
    name = "dsq"
    description = "Decoupled Scale Quantization: h[c, n] ~ s_c[c] * s_n[n] * q[c, n]"
    reduce_dims = (2,)
    uses_s_n = True
    kernel_modes = frozenset({"static", "dynamic"})

    def view(self, h, s_n):
        return h / s_n                                                         # s_n divided out

    def unview(self, v, s_n):
        return v * s_n

    def kernel_scales(self, static, s_n):
        return s_n, static
