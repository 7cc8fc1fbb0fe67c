"""`summary.md` of `qmamba inspect`: what was measured, the per-layer tables and a paragraph of
observations, generated from stats.json's dict."""

from __future__ import annotations

import math

from .probe import LABELS, SAMPLE_POSITIONS


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
