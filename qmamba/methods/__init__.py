"""Quantization methods: a registry of name -> function(model, qcfg, calib, **options).

Every method quantizes a float `MambaLM` in place for a `QuantConfig` (WxAyHz), using the
calibration token ids `calib` (N, L). A method also names its default state quantizer, which
fills the config's state_quant / state_scale when the user leaves them unset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import QMambaError


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


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        raise QMambaError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available() -> list[str]:
    _load_all()
    return list(METHODS)


def _load_all():
    from . import dsq, qmamba, quamba, rtn, smoothquant  # noqa: F401  (each registers itself)
