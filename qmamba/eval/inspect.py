"""Where a float Mamba model's outliers are: SSM state maxima, activation ranges per channel at
every quantization point, and the state quantization error of per-tensor, per-channel and DSQ
scales, from one calibration run; written as PNG plots, `summary.md` and `stats.json`
(`qmamba inspect`).

What is measured, per analysed layer (shapes as in `qmamba.models.scan`: d channels, n state
indices; Mamba2 channels are grouped by head, c = head * headdim + i):

  state maxima    max over all tokens of |h_t[c, n]|, the states of the exact per-token
                  recurrence (`selective_scan_ref` fed with the mixer's `per_channel` inputs,
                  captured by wrapping the mixer's `scan`): the map DSQ factorises into a channel
                  scale times a state-axis scale. Its profiles along each axis (max over the
                  other) and their max/median ratios, and per head for Mamba2.
  activations     max |a| per channel at every quantization point: the inputs of in_proj,
                  (Mamba1) dt_proj, out_proj, the conv input and the scan inputs x, B, C, dt and
                  the gate z (forward pre-hooks; Mamba1's x_proj reads x itself).
  state SQNR      10 log10(||h||^2 / ||h - Q(h)||^2) of one quantize-dequantize at `bits` of FP
                  states sampled at SAMPLE_POSITIONS evenly spaced tokens of every sequence, with
                  `StateQuantizer`s calibrated on those same states (observe -> finish_calibration
                  -> fake_quant), their maxima raised to the maxima over every token (the `amax`
                  static scales come from, as a calibration that observes every token has). A
                  single write of FP states: not the error the re-quantized recurrence
                  accumulates, which `qmamba eval` measures.

Matplotlib is used through its object-oriented API with the Agg canvas (no pyplot, no global
backend switch).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import QMambaError
from ..models.scan import selective_scan_ref
from ..quant.state import StateQuantizer

log = logging.getLogger("qmamba")

# state quantizers compared: (kind, scale mode), named "kind-mode"
QUANTIZERS = (("tensor", "dynamic"), ("channel", "dynamic"), ("dsq", "dynamic"),
              ("tensor", "static"), ("channel", "static"), ("dsq", "static"))
SAMPLE_POSITIONS = 8          # states kept per sequence for the SQNR (evenly spaced tokens)
SAMPLE_BUDGET = 1 << 21       # ... and at most this many floats of them per layer (reservoir)
MAX_ROWS = 512                # heatmap rows drawn; more channels are max-pooled (outliers survive)
OVERVIEW_ROWS = 256
TOP_K = 5
LABELS = {  # quantization point -> what it is, for titles
    "in_proj": "in_proj input", "conv": "conv input (quant_conv)", "x": "scan x (quant_x)",
    "dt_proj": "dt_proj input", "dt": "scan dt (quant_dt)", "B": "scan B (quant_B)",
    "C": "scan C (quant_C)", "z": "gate z (quant_z)", "out_proj": "out_proj input",
}


def quantizer_name(kind: str, mode: str) -> str:
    return f"{kind}-{mode}"


# ------------------------------------------------------------------------------ arguments
def parse_layers(spec: Optional[str], n_layer: Optional[int] = None) -> Optional[list[int]]:
    """"all" (or None) -> None; "0,3,5" -> [0, 3, 5] (sorted, unique, checked against n_layer)."""
    if spec is None or spec.strip().lower() == "all":
        return None
    try:
        out = [int(s) for s in spec.split(",")]
    except ValueError:
        out = []
    if not out or any(i < 0 for i in out):
        raise QMambaError(f"--layers must be 'all' or layer indices separated by commas (e.g. 0,3,5), got {spec!r}")
    if len(set(out)) != len(out):
        raise QMambaError(f"--layers lists a layer twice: {spec!r}")
    if n_layer is not None and max(out) >= n_layer:
        raise QMambaError(f"--layers {spec}: the model has {n_layer} layer{'s' if n_layer != 1 else ''} "
                          f"(indices 0..{n_layer - 1})")
    return sorted(out)


def check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise QMambaError(f"--bits must be between 2 and 8, got {bits}")
    return bits


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


# ------------------------------------------------------------------------------ the calibration run
@dataclass
class LayerRecord:
    """What the calibration run collected for one layer."""
    index: int
    d: int
    n: int
    headdim: int                                   # Mamba2 head dim; 1 for Mamba1
    amax: Tensor                                   # (d, n) max over tokens of |h|
    act: dict[str, Tensor] = field(default_factory=dict)   # point -> (channels,) max |a|
    samples: list[Tensor] = field(default_factory=list)     # (d, n) states for the SQNR
    seen: int = 0                                  # candidate sample states offered
    sqnr: dict[str, float] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return self.d // self.headdim


def _act_points(arch: str, mixer) -> list[tuple[str, torch.nn.Module]]:
    pts = [("in_proj", mixer.in_proj), ("conv", mixer.quant_conv), ("x", mixer.quant_x)]
    if arch == "mamba1":
        pts.append(("dt_proj", mixer.dt_proj))
    pts += [("dt", mixer.quant_dt), ("B", mixer.quant_B), ("C", mixer.quant_C), ("z", mixer.quant_z),
            ("out_proj", mixer.out_proj)]
    return pts


class _Probe:
    """Collects one layer's statistics: activation maxima (pre-hooks) and the states of the
    per-token recurrence (a wrapper of the mixer's `scan`)."""

    def __init__(self, rec: LayerRecord, mixer, arch: str, cap: int, seed: int):
        self.rec, self.mixer, self.arch, self.cap = rec, mixer, arch, cap
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + rec.index)
        self.handles = []
        self.keep: set[int] = set()
        self.t = 0

    def install(self):
        for name, mod in _act_points(self.arch, self.mixer):
            self.handles.append(mod.register_forward_pre_hook(self._act_hook(name)))
        self.mixer.scan = self._scan            # instance attribute shadows MixerBase.scan

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.mixer.__dict__.pop("scan", None)

    def _act_hook(self, name: str):
        def hook(module, args):
            a = args[0].detach().float().abs().flatten(0, -2).amax(0)      # (channels,)
            prev = self.rec.act.get(name)
            self.rec.act[name] = a if prev is None else torch.maximum(prev, a)
        return hook

    def _scan(self, x, dt, B, C, state):
        if state is not None:
            raise RuntimeError("inspect runs whole sequences without a cache")
        length = x.shape[1]
        k = min(SAMPLE_POSITIONS, length)
        self.keep = {round((j + 1) * length / k) for j in range(k)}        # 1-based token steps
        self.t = 0
        with torch.no_grad():
            y, _ = selective_scan_ref(*self.mixer.per_channel(x, dt, B, C), None, self._state_fn)
        return y

    def _state_fn(self, h: Tensor) -> Tensor:
        rec = self.rec
        torch.maximum(rec.amax, h.abs().amax(0), out=rec.amax)
        self.t += 1
        if self.t in self.keep:                 # reservoir over (sequence, position) candidates
            for i in range(h.shape[0]):
                rec.seen += 1
                if len(rec.samples) < self.cap:
                    rec.samples.append(h[i].detach().clone())
                else:
                    j = int(torch.randint(0, rec.seen, (1,), generator=self.gen))
                    if j < self.cap:
                        rec.samples[j] = h[i].detach().clone()
        return h


@torch.no_grad()
def collect(model, ids: Tensor, layers: Optional[Sequence[int]] = None, bits: int = 4,
            batch_size: int = 8, seed: int = 0, progress: bool = False) -> list[LayerRecord]:
    """Run `ids` (N, L) through the float model up to the last analysed layer and return one
    LayerRecord per analysed layer, SQNRs computed (samples then dropped)."""
    from tqdm.auto import tqdm

    if getattr(model, "quant_config", None) is not None or any(
            m.state_quant is not None for m in model.mixers()):
        raise QMambaError("inspect analyses float models; this model is already quantized")
    arch = model.config.arch
    n_layer = len(model.layers)
    layers = list(range(n_layer)) if layers is None else sorted(layers)
    if not layers or layers[0] < 0 or layers[-1] >= n_layer:
        raise QMambaError(f"layers to inspect must be indices in 0..{n_layer - 1}, got {layers}")
    device = next(model.parameters()).device
    probes = []
    for i in layers:
        mixer = model.layers[i].mixer
        d, n = mixer.ssm_state_shape()
        headdim = getattr(mixer, "headdim", 1) if arch == "mamba2" else 1
        rec = LayerRecord(i, d, n, headdim, torch.zeros(d, n, device=device))
        cap = max(4, min(256, SAMPLE_BUDGET // (d * n)))
        probes.append(_Probe(rec, mixer, arch, cap, seed))
    was_training = model.training
    model.eval()
    try:
        for p in probes:
            p.install()
        # progress: a bar on a terminal only (tqdm's disable=None)
        for s in tqdm(range(0, len(ids), batch_size), desc="inspect", unit="batch",
                      disable=None if progress else True, leave=False):
            hidden = model.backbone.embeddings(ids[s:s + batch_size].to(device))
            for layer in model.layers[:layers[-1] + 1]:
                hidden = layer(hidden)
    finally:
        for p in probes:
            p.remove()
        model.train(was_training)
    records = []
    for p in probes:
        rec = p.rec
        samples = torch.stack(rec.samples)
        if not torch.isfinite(samples).all() or not torch.isfinite(rec.amax).all():
            raise QMambaError(f"non-finite SSM state (NaN or inf) in layer {rec.index}; check the model")
        rec.sqnr = sqnr_of_states(samples, bits, rec.headdim, amax=rec.amax,
                                  where=f"backbone.layers.{rec.index}.mixer")
        rec.samples = []
        rec.amax, rec.act = rec.amax.cpu(), {k: v.cpu() for k, v in rec.act.items()}
        records.append(rec)
    return records


# ------------------------------------------------------------------------------ statistics
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


# ------------------------------------------------------------------------------ plots
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig, path: Path):
    fig.savefig(path, dpi=110)


def _plain_log(axis, values: Tensor):
    """Log-axis tick labels as plain numbers (0.3, 10, 2000) instead of mathtext (cheaper too),
    with as many minor labels as the range of `values` leaves room for."""
    from matplotlib.ticker import FuncFormatter

    pos = values[values > 0]
    numdec = math.log10(float(pos.max()) / float(pos.min())) if pos.numel() else 0.0
    keep = {2, 3, 4, 5, 6, 7, 8, 9} if numdec < 0.5 else ({2, 5} if numdec < 1.0 else ({3} if numdec < 1.6 else set()))

    def fmt(v, _pos):
        if v <= 0:
            return ""
        e = math.floor(math.log10(v) + 1e-9)
        m = round(v / 10 ** e)
        return f"{v:.3g}" if m == 1 or m in keep else ""

    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(FuncFormatter(fmt))


def _pool_rows(a: Tensor, rows: int) -> tuple[Tensor, int]:
    """Max-pool the channel axis of (d, n) to at most `rows` rows; returns it and the factor."""
    d = a.shape[0]
    f = max(1, -(-d // rows))
    if f == 1:
        return a, 1
    pad = (-d) % f
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    return a.view(-1, f, a.shape[1]).amax(1), f


def _lognorm(vmax: float, vmin_pos: float):
    from matplotlib.colors import LogNorm

    vmax = max(vmax, 1e-30)
    return LogNorm(vmin=max(vmin_pos, vmax * 1e-5) if vmin_pos > 0 else vmax * 1e-5, vmax=vmax)


def _min_pos(a: Tensor) -> float:
    pos = a[a > 0]
    return float(pos.min()) if pos.numel() else 0.0


def _head_axis(ax, rec: LayerRecord, color="white", ticks=True):
    """Lines between heads (and head labels on the y axis) of a channel axis."""
    if rec.headdim <= 1:
        return
    for hd in range(1, rec.heads):
        ax.axhline(hd * rec.headdim - 0.5, color=color, lw=0.6, alpha=0.8)
    if ticks:
        step = max(1, -(-rec.heads // 16))
        hs = list(range(0, rec.heads, step))
        ax.set_yticks([h * rec.headdim + rec.headdim / 2 - 0.5 for h in hs], [f"h{h}" for h in hs])


def plot_state_heatmap(rec: LayerRecord, path: Path, title: str, tokens: int):
    """max |h| (channels x state index), log colours, with both axis profiles."""
    amax = rec.amax.float()
    st = layer_stats_light(rec)
    fig = _figure(8.5, 7.5)
    gs = fig.add_gridspec(2, 3, width_ratios=[5, 1.3, 0.18], height_ratios=[1.2, 5])
    ax = fig.add_subplot(gs[1, 0])
    top = fig.add_subplot(gs[0, 0], sharex=ax)
    right = fig.add_subplot(gs[1, 1], sharey=ax)
    cax = fig.add_subplot(gs[1, 2])
    pooled, f = _pool_rows(amax, MAX_ROWS)
    norm = _lognorm(float(amax.max()), _min_pos(amax))
    im = ax.imshow(pooled.numpy(), aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                   extent=(-0.5, rec.n - 0.5, pooled.shape[0] * f - 0.5, -0.5))
    ax.set_ylim(rec.d - 0.5, -0.5)
    ax.set_xlabel("state index n")
    ylabel = "channel c (grouped by head)" if rec.headdim > 1 else "channel c"
    ax.set_ylabel(ylabel + (f", max over {f} rows per pixel row" if f > 1 else ""))
    _head_axis(ax, rec)
    fig.colorbar(im, cax=cax, label="max over tokens of |h[c, n]| (log scale)")
    # state-axis profile: max over channels
    prof_n = amax.amax(0)
    floor = max(_min_pos(prof_n), 1e-30) / 2
    top.stairs(prof_n.clamp(min=floor).numpy(), torch.arange(rec.n + 1).numpy() - 0.5, baseline=floor,
               fill=True, color="tab:blue", lw=0)
    top.axhline(float(prof_n.median()), color="k", ls="--", lw=0.8, label="median")
    top.set_yscale("log")
    _plain_log(top.yaxis, prof_n)
    top.set_ylabel("max over c")
    top.set_title(f"state axis: max/median {st['state_ratio']:.1f}x", fontsize=9, loc="left")
    top.tick_params(labelbottom=False)
    top.legend(fontsize=7, loc="upper right")
    # channel profile: max over state indices
    prof_c = amax.amax(1)
    right.plot(prof_c.numpy(), range(rec.d), color="tab:red", lw=0.8)
    right.axvline(float(prof_c.median()), color="k", ls="--", lw=0.8)
    right.set_xscale("log")
    _plain_log(right.xaxis, prof_c)
    right.set_xlabel("max over n")
    right.set_title(f"channels: {st['channel_ratio']:.1f}x", fontsize=9)
    right.tick_params(labelleft=False)
    _head_axis(right, rec, color="0.6", ticks=False)
    heads = f", heads {st['head_ratio']:.1f}x" if rec.headdim > 1 else ""
    fig.suptitle(f"{title}: layer {rec.index}, max |h| over {tokens:,} tokens "
                 f"(channel axis {st['channel_ratio']:.1f}x, state axis {st['state_ratio']:.1f}x{heads}, "
                 "max/median)", fontsize=10)
    _save(fig, path)


def layer_stats_light(rec: LayerRecord) -> dict:
    amax = rec.amax.float()
    out = {"channel_ratio": ratio(amax.amax(1)), "state_ratio": ratio(amax.amax(0))}
    if rec.headdim > 1:
        out["head_ratio"] = ratio(amax.view(rec.heads, rec.headdim, rec.n).amax((1, 2)))
    return out


def plot_overview(records: list[LayerRecord], path: Path, title: str):
    """One panel per layer, one shared log colour scale."""
    k = len(records)
    ncols = k if k <= 4 else min((4, 3), key=lambda c: (-k % c, -c))     # fewest empty panels
    nrows = -(-k // ncols)
    fig = _figure(2.9 * ncols + 1.2, 2.7 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    vmax = max(float(r.amax.max()) for r in records)
    vmin = min((m for m in (_min_pos(r.amax) for r in records) if m > 0), default=0.0)
    norm = _lognorm(vmax, vmin)
    im = None
    for idx, ax in enumerate(axes.flat):
        if idx >= k:
            ax.set_visible(False)
            continue
        rec = records[idx]
        pooled, f = _pool_rows(rec.amax.float(), OVERVIEW_ROWS)
        im = ax.imshow(pooled.numpy(), aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                       extent=(-0.5, rec.n - 0.5, pooled.shape[0] * f - 0.5, -0.5))
        ax.set_ylim(rec.d - 0.5, -0.5)
        st = layer_stats_light(rec)
        ax.set_title(f"layer {rec.index}: ch {st['channel_ratio']:.0f}x, n {st['state_ratio']:.1f}x", fontsize=9)
        if rec.headdim > 1:
            for hd in range(1, rec.heads):
                ax.axhline(hd * rec.headdim - 0.5, color="white", lw=0.4, alpha=0.7)
        if idx % ncols == 0:
            ax.set_ylabel("channel" + (" (by head)" if rec.headdim > 1 else ""))
        if idx // ncols == nrows - 1 or idx + ncols >= k:
            ax.set_xlabel("state index")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="max |h| over tokens (log)", shrink=0.9)
    fig.suptitle(f"{title}: SSM state magnitude per layer (ratios: max/median along channels, state axis)",
                 fontsize=10)
    _save(fig, path)


def plot_activations(rec: LayerRecord, path: Path, title: str, arch: str, ngroups: int = 1):
    """One subplot per quantization point: max |activation| per channel, in channel order."""
    names = [n for n in LABELS if n in rec.act]
    ncols = 3
    nrows = -(-len(names) // ncols)
    fig = _figure(13, 2.9 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        prof = rec.act[name].float()
        k = prof.numel()
        pos = prof[prof > 0]
        floor = float(pos.min()) / 2 if pos.numel() else 1e-30
        ax.stairs(prof.clamp(min=floor).numpy(), torch.arange(k + 1).numpy() - 0.5, baseline=floor,
                  fill=True, color="tab:blue", lw=0)
        med = float(prof.median())
        ax.axhline(med, color="k", ls="--", lw=0.8)
        top = prof.topk(min(3, k))
        ax.scatter(top.indices.numpy(), top.values.numpy(), color="tab:red", s=12, zorder=3)
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            ax.annotate(str(i), (i, v), fontsize=7, color="tab:red", xytext=(2, 2), textcoords="offset points")
        if prof.max() > 0:
            ax.set_yscale("log")
            _plain_log(ax.yaxis, prof)
        ax.set_xlim(-0.5, k - 0.5)
        # structure of the channel axis: heads (Mamba2 d-sized points), x|B|C of the conv input
        if arch == "mamba2" and name in ("x", "z", "out_proj") and rec.headdim > 1 and rec.heads <= 64:
            for hd in range(1, rec.heads):
                ax.axvline(hd * rec.headdim - 0.5, color="0.75", lw=0.5)
        if name == "conv" and arch == "mamba2":
            gn = ngroups * rec.n
            for b in (rec.d, rec.d + gn):
                ax.axvline(b - 0.5, color="tab:green", lw=0.8)
        r = ratio(prof)
        ax.set_title(f"{LABELS[name]}{' = x_proj input' if name == 'x' and arch == 'mamba1' else ''}\n"
                     f"{k} ch, max {float(prof.max()):.3g}, max/median {r:.1f}x", fontsize=8.5)
        ax.tick_params(which="both", labelsize=7)
        ax.set_xlabel("channel", fontsize=7)
        ax.set_ylabel("max |a| (log)", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    extra = " (conv input: x | B | C split by green lines; heads by grey lines)" if arch == "mamba2" else ""
    fig.suptitle(f"{title}: layer {rec.index}, per-channel activation maxima at the quantization "
                 f"points; dashed = median, red = top 3{extra}", fontsize=10)
    _save(fig, path)


def plot_sqnr(records: list[LayerRecord], path: Path, title: str, bits: int):
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    xs = [r.index for r in records]
    colors = {"tensor": "tab:gray", "channel": "tab:blue", "state": "tab:orange", "head": "tab:purple",
              "group": "tab:brown", "dsq": "tab:red"}
    for name in records[0].sqnr:
        kind, mode = name.split("-")
        ys = [r.sqnr[name] if math.isfinite(r.sqnr[name]) else float("nan") for r in records]
        ax.plot(xs, ys, marker="o" if mode == "dynamic" else "s", ls="-" if mode == "dynamic" else "--",
                color=colors.get(kind, None), label=f"{kind}, {mode} scale")
    ax.set_xticks(xs)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"state SQNR at H{bits} (dB, higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    ax.set_title(f"{title}: H{bits} state quantization error per layer\n"
                 "(one quantize-dequantize of FP states sampled during calibration)", fontsize=10)
    _save(fig, path)


# ------------------------------------------------------------------------------ summary
def _fmt(v: float, spec: str = ".1f") -> str:
    return format(v, spec) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def observations(stats: dict) -> str:
    """A short paragraph of what the numbers say."""
    layers = stats["layers"]
    if not layers:
        return ""
    cr = [L["state"]["channel_ratio"] for L in layers]
    sr = [L["state"]["state_ratio"] for L in layers]
    parts = [f"Across the {len(layers)} analysed layer(s), the calibrated state maxima vary "
             f"{_fmt(min(cr))}-{_fmt(max(cr))}x along the channel axis and {_fmt(min(sr))}-{_fmt(max(sr))}x "
             "along the state axis (max/median of the per-channel and per-state-index maxima)."]
    big = max(layers, key=lambda L: L["state"]["max"])
    a = big["state"]["argmax"]
    where = f"channel {a['channel']}" + (f" (head {a['head']})" if "head" in a else "") + f", state index {a['state_index']}"
    parts.append(f"The largest state entry is in layer {big['layer']} (max |h| = {big['state']['max']:.3g} at {where}; "
                 f"{big['state']['max'] / max(big['state']['median'], 1e-30):.0f}x the median entry of that layer).")
    if "heads" in layers[0]:
        heads = []
        for L in layers:
            prof = L["state"]["head_profile"]
            med = sorted(prof)[(len(prof) - 1) // 2] or 1e-30
            for h, v in L["state"]["top_heads"][:1]:
                heads.append((v / med, L["layer"], h))
        heads.sort(reverse=True)
        txt = ", ".join(f"layer {li} head {h} ({r:.1f}x the median head)" for r, li, h in heads[:3])
        parts.append(f"The outlier heads are {txt}; heads differ by up to "
                     f"{_fmt(max(L['state']['head_ratio'] for L in layers))}x (max/median) within a layer.")
    else:
        top = sorted(((L["state"]["top_channels"][0][1] / max(L["state"]["median"], 1e-30), L["layer"],
                       L["state"]["top_channels"][0][0]) for L in layers), reverse=True)
        parts.append("The outlier channels are " + ", ".join(
            f"layer {li} channel {c}" for _, li, c in top[:3]) + ".")
    acts = [(p["ratio"], L["layer"], name, p["top_channels"][0][0])
            for L in layers for name, p in L["activations"].items() if math.isfinite(p["ratio"])]
    if acts:
        r, li, name, c = max(acts)
        parts.append(f"Among the activations, the strongest channel outlier is at {LABELS[name]} of layer {li} "
                     f"(channel {c}, {r:.1f}x the median channel).")
    bits = stats["bits"]
    mean = {k: sum(L["sqnr_db"][k] for L in layers) / len(layers) for k in layers[0]["sqnr_db"]}
    if all(math.isfinite(v) for v in mean.values()):
        txt = ", ".join(f"{k} {v:.1f} dB" for k, v in mean.items())
        parts.append(f"At H{bits}, the mean state SQNR over layers is {txt}.")
        if "dsq-dynamic" in mean and "tensor-dynamic" in mean:
            gaps = [(L["sqnr_db"]["dsq-dynamic"] - L["sqnr_db"]["tensor-dynamic"], L["layer"]) for L in layers]
            g, li = max(gaps)
            parts.append(f"DSQ (dynamic channel scale) gains {mean['dsq-dynamic'] - mean['tensor-dynamic']:+.1f} dB "
                         f"over per-tensor on average, most in layer {li} ({g:+.1f} dB)"
                         + (f", and {mean['dsq-dynamic'] - mean['channel-dynamic']:+.1f} dB over per-channel."
                            if "channel-dynamic" in mean else "."))
    return " ".join(parts)


def summary_markdown(stats: dict) -> str:
    m, data, bits = stats["model"], stats["data"], stats["bits"]
    layers = stats["layers"]
    qnames = list(layers[0]["sqnr_db"]) if layers else []
    lines = [f"# qmamba inspect: {m['name']}", "",
             f"- model: `{m['name']}` ({m['arch']}, {m['parameters'] / 1e6:.2f} M parameters, {m['n_layer']} layers, "
             f"{m['channels']} state channels{', ' + str(m['heads']) + ' heads of ' + str(m['headdim']) if m.get('heads') else ''}, "
             f"d_state {m['state_size']}); layers analysed: {', '.join(str(L['layer']) for L in layers)}",
             f"- data: {data['nsamples']} sequences x {data['seqlen']} tokens ({data['tokens']:,} tokens) at seeded "
             f"random offsets (seed {data['seed']}) of {data['text']}",
             "- states: those of the exact per-token recurrence of the float model; maxima over every token; "
             f"SQNR on up to {SAMPLE_POSITIONS} states per sequence (evenly spaced tokens), quantizers calibrated "
             "on those states with their maxima raised to the maxima over every token",
             "- Q: `StateQuantizer` of qmamba (per-tensor, per-channel, DSQ = per-channel x static state-axis "
             "scale), with scales computed at every write (dynamic) or fixed from calibration (static, clip "
             "factor searched)",
             f"- state bits: H{bits}; SQNR = 10 log10(||h||^2 / ||h - Q(h)||^2) of one quantize-dequantize "
             "(the accumulated error of the re-quantized recurrence is what `qmamba eval --quant` measures)",
             f"- time: {stats['seconds']:.1f} s", "",
             "## State maxima and quantization error per layer", "",
             "Ratios are max/median of the state-maxima profile along each axis (per-channel: max over the state "
             "index; per-state-index: max over channels" + ("; per-head: max over the head" if layers and "heads" in layers[0] else "") + ").",
             ""]
    head = "heads" in layers[0] if layers else False
    cols = ["layer", "max abs h", "channel max/med", "state max/med"] + (["head max/med"] if head else []) + \
        [f"SQNR {q} (dB)" for q in qnames]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for L in layers:
        s = L["state"]
        row = [str(L["layer"]), f"{s['max']:.3g}", _fmt(s["channel_ratio"]), _fmt(s["state_ratio"])]
        if head:
            row.append(_fmt(s["head_ratio"]))
        row += [_fmt(L["sqnr_db"][q]) for q in qnames]
        lines.append("| " + " | ".join(row) + " |")
    points = [p for p in LABELS if layers and p in layers[0]["activations"]]
    lines += ["", "## Activation channel outliers (max/median of the per-channel maxima)", "",
              "| layer | " + " | ".join(points) + " |", "|" + "---|" * (len(points) + 1)]
    for L in layers:
        lines.append(f"| {L['layer']} | " + " | ".join(_fmt(L["activations"][p]["ratio"]) for p in points) + " |")
    lines += ["", "## Observations", "", observations(stats), "", "## Files", ""]
    lines += [f"- `{f}`" for f in stats["files"]] + ["- `stats.json` (every number above, with the profiles)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the whole report
def _title(name: str) -> str:
    return Path(name).name or name


def _readable(folder: Path):
    """The permissions of a plain mkdir / open (temporary folders and files are private)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def inspect_model(loaded, out, *, calib=None, nsamples: int = 16, seqlen: int = 512, bits: int = 4,
                  layers: Optional[Sequence[int]] = None, force: bool = False, seed: int = 0,
                  batch_size: int = 8, progress: bool = False) -> dict:
    """Calibrate, analyse and write the report folder `out` atomically; returns stats.json's dict."""
    from ..models.save import atomic_folder
    from ..quant.calibrate import DEFAULT_CALIB_TEXT, calibration_ids
    from ..utils.io import atomic_write_json, atomic_write_text

    out = Path(out)
    check_bits(bits)
    if out.exists() and not force:
        raise QMambaError(f"output folder {out} already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QMambaError(f"--out {out} is a file, not a folder")
    if batch_size < 1:
        raise QMambaError(f"--batch-size must be >= 1, got {batch_size}")
    model = loaded.model
    cfg = model.config
    if layers is not None:
        layers = parse_layers(",".join(str(i) for i in layers), cfg.n_layer)
    t0 = time.time()
    ids = calibration_ids(loaded.tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    log.info("inspect: %d sequences x %d tokens through %s", nsamples, seqlen, loaded.name)
    records = collect(model, ids, layers, bits, batch_size=batch_size, seed=seed, progress=progress)
    m0 = model.layers[0].mixer
    name = _title(loaded.name)
    stats = {
        "model": {"name": loaded.name, "path": str(loaded.path), "arch": cfg.arch,
                  "parameters": model.num_parameters(), "n_layer": cfg.n_layer,
                  "channels": m0.ssm_state_shape()[0], "state_size": m0.ssm_state_shape()[1],
                  **({"heads": m0.nheads, "headdim": m0.headdim, "ngroups": m0.ngroups} if cfg.arch == "mamba2" else {}),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "data": {"text": str(calib) if calib is not None else f"the shipped validation text ({DEFAULT_CALIB_TEXT.name})",
                 "nsamples": nsamples, "seqlen": seqlen, "tokens": nsamples * seqlen, "seed": seed},
        "bits": bits,
        "quantizers": [quantizer_name(k, m) for k, m in QUANTIZERS],
        "sqnr_definition": "10 log10(sum h^2 / sum (h - Q(h))^2) over FP states sampled during calibration, "
                           "one quantize-dequantize with scales calibrated on the same states (maxima over "
                           "every token)",
        "state_samples_per_sequence": SAMPLE_POSITIONS,
        "files": [],
        "layers": [layer_stats(r) for r in records],
    }
    tmp, commit, abort = atomic_folder(out, force)
    try:
        files = []

        def add(fname: str) -> Path:
            files.append(fname)
            return tmp / fname

        plot_overview(records, add("state_overview.png"), name)
        plot_sqnr(records, add("state_sqnr.png"), name, bits)
        width = max(2, len(str(cfg.n_layer - 1)))
        for r in records:
            plot_state_heatmap(r, add(f"state_heatmap_layer{r.index:0{width}d}.png"), name, nsamples * seqlen)
        for r in records:
            plot_activations(r, add(f"activations_layer{r.index:0{width}d}.png"), name, cfg.arch,
                             getattr(m0, "ngroups", 1))
        stats["files"] = files
        stats["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_text(tmp / "summary.md", summary_markdown(stats))
        _readable(tmp)
        commit()
    except BaseException:
        abort()
        raise
    return stats
