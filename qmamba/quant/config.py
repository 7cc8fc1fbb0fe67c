"""`QuantConfig`: what is quantized and how, parsed from the paper's WxAyHz notation.

    W8A8H4  8-bit weights, 8-bit activations, 4-bit SSM state cache
    W8A8    state kept in floating point          H4      only the state
    W4A16   4-bit weights, activations in float   (a letter left out, or 16, means float)
    W8A8H4KV8  as W8A8H4, plus an 8-bit KV cache in the attention layers of a hybrid model

W and H take 2..8 bits, A 4..8, KV 8 or 4, all integers, symmetric. Weights are per output channel (or in
groups along the input dim), activations static per-tensor (from calibration) or dynamic
per-token, the state by one of the quantizers in `STATE_QUANTIZERS`. The config serializes into
a checkpoint's `config.json["quantization_config"]`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import QMambaError
from .state_layout import LAYOUTS

# the state quantizers by name, each described by its layout class (`qmamba.quant.state_layout`)
STATE_QUANTIZERS = {name: layout.description for name, layout in LAYOUTS.items()}
SCALE_MODES = ("dynamic", "static")
ROUNDINGS = ("nearest", "stochastic")
FORMAT_VERSION = 1

_SPEC = re.compile(r"^(?:w(\d+))?(?:a(\d+))?(?:h(\d+))?(?:kv(\d+))?$", re.IGNORECASE)
KV_BITS = (8, 4)
SPEC_HELP = ("a WxAyHz[KVb] string such as w8a8h4, w8a8, w4a16, w4a8h8, h4 or w8a8h4kv8 "
             "(W and H in 2..8 bits, A in 4..8, KV 8 or 4; a missing letter or 16 means floating point)")


@dataclass(frozen=True)
class QuantConfig:
    w_bits: Optional[int] = None          # None: floating-point weights
    a_bits: Optional[int] = None          # None: floating-point activations
    h_bits: Optional[int] = None          # None: floating-point SSM state
    kv_bits: Optional[int] = None         # None: floating-point KV cache (attention layers of hybrids)
    w_group_size: int = 0                 # 0: per output channel; else groups along the input dim
    a_dynamic: bool = False               # False: static per-tensor; True: dynamic per-token
    a_observer: str = "minmax"            # "minmax" | "percentile" (static scales)
    a_percentile: float = 99.99
    state_quant: Optional[str] = None     # one of STATE_QUANTIZERS; None: the method's default
    state_scale: Optional[str] = None     # per-write scale mode (dsq: of s_c); None: the method's
    state_rounding: str = "nearest"       # "nearest" | "stochastic" (seeded) state writes
    state_group_size: int = 8             # state indices per group ("group" quantizer)
    kv_group_size: int = 32               # tokens per key scale of the KV cache (qmamba.quant.kv)
    quantize_head: bool = False           # also quantize embedding and lm_head weights
    seed: int = 0

    def __post_init__(self):
        for name, lo, hi in (("w_bits", 2, 8), ("a_bits", 4, 8), ("h_bits", 2, 8)):
            v = getattr(self, name)
            if v is not None and not lo <= v <= hi:
                raise QMambaError(f"{name[0].upper()}{v} is not supported: {SPEC_HELP}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise QMambaError(f"KV{self.kv_bits} is not supported: the KV cache takes 8 or 4 bits "
                              f"(or 16 for floating point)")
        if self.state_quant is not None and self.state_quant not in LAYOUTS:
            raise QMambaError(f"unknown state quantizer {self.state_quant!r}; "
                              f"choose one of {', '.join(LAYOUTS)}")
        if self.state_scale is not None and self.state_scale not in SCALE_MODES:
            raise QMambaError(f"unknown state scale mode {self.state_scale!r}; choose {' or '.join(SCALE_MODES)}")
        if self.state_rounding not in ROUNDINGS:
            raise QMambaError(f"unknown state rounding {self.state_rounding!r}; choose {' or '.join(ROUNDINGS)}")
        if self.a_observer not in ("minmax", "percentile"):
            raise QMambaError(f"unknown activation observer {self.a_observer!r}; choose minmax or percentile")
        if self.w_group_size < 0 or self.state_group_size <= 0 or self.kv_group_size <= 0:
            raise QMambaError("group sizes must be positive")

    @classmethod
    def parse(cls, spec: str, **options) -> "QuantConfig":
        """QuantConfig from 'w8a8h4' (any case) plus keyword options."""
        m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
        if not m or not any(m.groups()):
            raise QMambaError(f"bad quantization config {spec!r}: expected {SPEC_HELP}")
        w, a, h, kv = (None if g is None or int(g) == 16 else int(g) for g in m.groups())
        if w is None and a is None and h is None and kv is None:
            raise QMambaError(f"quantization config {spec!r} quantizes nothing: expected {SPEC_HELP}")
        return cls(w_bits=w, a_bits=a, h_bits=h, kv_bits=kv, **options)

    @property
    def name(self) -> str:
        """Canonical WxAyHz[KVb] name, e.g. W8A8H4 or W8A8H4KV8 (float parts left out)."""
        parts = [f"{k}{v}" for k, v in (("W", self.w_bits), ("A", self.a_bits), ("H", self.h_bits),
                                        ("KV", self.kv_bits)) if v]
        return "".join(parts) or "FP"

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"config": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})
