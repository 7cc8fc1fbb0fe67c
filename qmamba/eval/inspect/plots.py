"""The PNG plots of `qmamba inspect`: the state-maxima map of every layer (one overview and one
heatmap per layer with its axis profiles), the activation maxima per channel at every
quantization point, and the state SQNR per layer.

Matplotlib is used through its object-oriented API with the Agg canvas (no pyplot, no global
backend switch).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .probe import LABELS, LayerRecord
from .statistics import ratio, state_ratios

MAX_ROWS = 512                # heatmap rows drawn; more channels are max-pooled (outliers survive)
OVERVIEW_ROWS = 256


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
    st = state_ratios(rec)
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
        st = state_ratios(rec)
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


def plot_activations(rec: LayerRecord, path: Path, title: str, layer_type: str, ngroups: int = 1):
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
        if layer_type == "mamba2" and name in ("x", "z", "out_proj") and rec.headdim > 1 and rec.heads <= 64:
            for hd in range(1, rec.heads):
                ax.axvline(hd * rec.headdim - 0.5, color="0.75", lw=0.5)
        if name == "conv" and layer_type == "mamba2":
            gn = ngroups * rec.n
            for b in (rec.d, rec.d + gn):
                ax.axvline(b - 0.5, color="tab:green", lw=0.8)
        r = ratio(prof)
        ax.set_title(f"{LABELS[name]}{' = x_proj input' if name == 'x' and layer_type == 'mamba1' else ''}\n"
                     f"{k} ch, max {float(prof.max()):.3g}, max/median {r:.1f}x", fontsize=8.5)
        ax.tick_params(which="both", labelsize=7)
        ax.set_xlabel("channel", fontsize=7)
        ax.set_ylabel("max |a| (log)", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    extra = " (conv input: x | B | C split by green lines; heads by grey lines)" if layer_type == "mamba2" else ""
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
