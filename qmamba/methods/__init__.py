"""Quantization methods: a registry of name -> `Method` (`qmamba.methods.registry`).

Every method quantizes a float `MambaLM` in place for a `QuantConfig` (WxAyHz), using the
calibration token ids `calib` (N, L), through one lifecycle (transform -> install quantizers ->
calibrate -> reconstruct -> round) whose steps it overrides, with its options as a dataclass.
A method also names its default state quantizer, which fills the config's state_quant /
state_scale when the user leaves them unset.
"""

from __future__ import annotations

from typing import Union

from ..errors import QMambaError
from ..quant.config import QuantConfig
from .registry import METHODS, Method


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        raise QMambaError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_config(config: Union[str, QuantConfig], method: str, **options) -> QuantConfig:
    """A QuantConfig with the method's default state quantizer filled in."""
    m = get_method(method)
    qcfg = QuantConfig.parse(config, **options) if isinstance(config, str) else config.replace(**options)
    return qcfg.replace(state_quant=qcfg.state_quant or m.state_quant,
                        state_scale=qcfg.state_scale or m.state_scale)


def available() -> list[str]:
    _load_all()
    return list(METHODS)


def _load_all():
    from . import dsq, qmamba, quamba, rtn, smoothquant  # noqa: F401  (each registers itself)
