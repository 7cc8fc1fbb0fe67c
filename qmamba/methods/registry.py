"""The table of quantization methods, which each method module fills with `register`.

It imports none of them: `qmamba.methods` imports the method modules (so that they register
themselves), and the method modules import only this table, never the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    fn: Callable
    state_quant: str          # default state quantizer
    state_scale: str          # default state scale mode
    restore: Optional[Callable] = None   # rebuilds method-specific modules when loading a checkpoint


METHODS: dict[str, Method] = {}


def register(name: str, description: str, state_quant: str = "tensor", state_scale: str = "static",
             restore: Optional[Callable] = None):
    def deco(fn):
        METHODS[name] = Method(name, description, fn, state_quant, state_scale, restore)
        return fn
    return deco
