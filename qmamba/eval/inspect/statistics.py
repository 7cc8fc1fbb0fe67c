"""The numbers of `qmamba inspect`: state SQNR of each state quantizer, max/median ratios and
top entries of the per-axis profiles, and the JSON-able statistics of one layer (rounded to 4
significant digits)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...quant.state import StateQuantizer
from .probe import LayerRecord

# state quantizers compared: (kind, scale mode), named "kind-mode"
QUANTIZERS = (("tensor", "dynamic"), ("channel", "dynamic"), ("dsq", "dynamic"),
              ("tensor", "static"), ("channel", "static"), ("dsq", "static"))
TOP_K = 5


def quantizer_name(kind: str, mode: str) -> str:
    return f"{kind}-{mode}"


# ------------------------------------------------------------------------------ SQNR
def sqnr_db(h: Tensor, hq: Tensor) -> float:
    """10 log10(||h||^2 / ||h - hq||^2) in dB (inf when hq == h)."""
    h, hq = h.double(), hq.double()
    signal, noise = h.pow(2).sum().item(), (h - hq).pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def make_state_quantizers(bits: int, d: int, n: int, headdim: int = 1,
                          configs: Sequence[tuple[str, str]] = QUANTIZERS,
                          where: str = "") -> dict[str, StateQuantizer]:
    """One observing StateQuantizer per (kind, scale mode), named "kind-mode"."""
    out = {}
    for kind, mode in configs:
        q = StateQuantizer(kind, bits, d, n, headdim=headdim, scale_mode=mode, where=where)
        q.mode = "observe"
        out[quantizer_name(kind, mode)] = q
    return out


@torch.no_grad()
def sqnr_of_states(states: Tensor, bits: int, headdim: int = 1,
                   configs: Sequence[tuple[str, str]] = QUANTIZERS, amax: Optional[Tensor] = None,
                   where: str = "") -> dict[str, float]:
    """SQNR (dB) of each quantizer calibrated on `states` (m, d, n) and applied to them (every
    state with its own per-write scales). `amax` (d, n): maxima over more states than the
    sample (all tokens), folded into the calibrated maxima that static scales come from."""
    out = {}
    for name, q in make_state_quantizers(bits, states.shape[1], states.shape[2], headdim, configs, where).items():
        q.to(states.device)
        q.observe(states)
        if amax is not None:
            q.amax.copy_(torch.maximum(q.amax, amax.to(q.amax)))
        q.finish_calibration()
        out[name] = sqnr_db(states, q.fake_quant(states))
    return out


def add_sqnr(records: Sequence[LayerRecord], bits: int) -> None:
    """Each record's state SQNRs (`sqnr_of_states` of its sampled states, maxima raised to its
    maxima over every token); the samples are dropped."""
    for rec in records:
        rec.sqnr = sqnr_of_states(torch.stack(rec.samples), bits, rec.headdim, amax=rec.amax,
                                  where=f"backbone.layers.{rec.index}.mixer")
        rec.samples = []


# ------------------------------------------------------------------------------ profiles
def ratio(profile: Tensor) -> float:
    """max / median of a non-negative profile (inf for a zero median)."""
    med = profile.float().median().item()
    mx = profile.float().max().item()
    return mx / med if med > 0 else math.inf


def _top(profile: Tensor, k: int = TOP_K) -> list[list]:
    vals, idx = profile.float().topk(min(k, profile.numel()))
    return [[int(i), _r(v)] for i, v in zip(idx.tolist(), vals.tolist())]


def _r(v: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (keeps stats.json small)."""
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return v
    return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))


# ------------------------------------------------------------------------------ per layer
def layer_stats(rec: LayerRecord) -> dict:
    """The JSON-able statistics of one layer."""
    amax = rec.amax.float()
    prof_c, prof_n = amax.amax(1), amax.amax(0)                       # (d,), (n,)
    flat = int(amax.argmax())
    c, j = divmod(flat, rec.n)
    state = {
        "max": _r(amax.max()), "median": _r(amax.median()),
        "argmax": {"channel": c, "state_index": j, **({"head": c // rec.headdim} if rec.headdim > 1 else {})},
        "channel_ratio": _r(ratio(prof_c)), "state_ratio": _r(ratio(prof_n)),
        "channel_profile": [_r(v) for v in prof_c.tolist()],
        "state_profile": [_r(v) for v in prof_n.tolist()],
        "top_channels": _top(prof_c), "top_state_indices": _top(prof_n),
    }
    if rec.headdim > 1:
        prof_h = amax.view(rec.heads, rec.headdim, rec.n).amax((1, 2))
        state.update(head_ratio=_r(ratio(prof_h)), head_profile=[_r(v) for v in prof_h.tolist()],
                     top_heads=_top(prof_h, 3))
    acts = {}
    for name, prof in rec.act.items():
        acts[name] = {"channels": prof.numel(), "max": _r(prof.max()), "median": _r(prof.median()),
                      "ratio": _r(ratio(prof)), "top_channels": _top(prof, 3),
                      "profile": [_r(v) for v in prof.tolist()]}
    return {"layer": rec.index, "channels": rec.d, "state_size": rec.n,
            **({"heads": rec.heads, "headdim": rec.headdim} if rec.headdim > 1 else {}),
            "state": state, "activations": acts, "sqnr_db": {k: _r(v) for k, v in rec.sqnr.items()}}


def state_ratios(rec: LayerRecord) -> dict:
    """The max/median ratios of the state maxima along each axis (and per head), unrounded."""
    amax = rec.amax.float()
    out = {"channel_ratio": ratio(amax.amax(1)), "state_ratio": ratio(amax.amax(0))}
    if rec.headdim > 1:
        out["head_ratio"] = ratio(amax.view(rec.heads, rec.headdim, rec.n).amax((1, 2)))
    return out
