"""`qmamba inspect [MODEL] --out DIR [--calib FILE] [--nsamples N] [--seqlen L] [--bits 4]
[--layers all|0,3,5]`: where a float model's outliers are, as plots.

One calibration run of the float model (default: 16 sequences x 512 tokens of the shipped
validation text) writes into DIR, atomically (a temporary folder, then a rename):
  state_overview.png            max |h| over tokens (channels x state index), one panel per layer
  state_heatmap_layerNN.png     the same map per layer with its per-channel and per-state-index
                                profiles (Mamba2: channels grouped by head, lines between heads)
  activations_layerNN.png       max |activation| per channel at every quantization point
  state_sqnr.png                state SQNR (dB) at --bits for per-tensor, per-channel and DSQ
                                scales, dynamic and static, per layer
  summary.md, stats.json        the per-layer numbers (max/median ratios, SQNR) and observations
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import QMambaError
from ..utils.io import check_output
from .common import add_model_args, check_calibration_size


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="plots of state and activation outliers of a float model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--calib", type=Path, metavar="FILE", help="calibration text (default: the shipped validation text)")
    p.add_argument("--nsamples", type=int, default=16, metavar="N", help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=512, metavar="L", help="tokens per sequence (default 512)")
    p.add_argument("--bits", type=int, default=4, help="state bits of the SQNR comparison, 2..8 (default 4)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices (default all)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward pass (default 8)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..api import load
    from ..eval.inspect.report import check_bits, inspect_model, parse_layers

    # everything that needs no model is checked before loading it
    check_bits(args.bits)
    layers = parse_layers(args.layers)
    check_output(args.out, "--out", folder=True, force=args.force)
    if args.nsamples < 1 or args.seqlen < 2:
        raise QMambaError("--nsamples must be >= 1 and --seqlen >= 2")
    if args.batch_size < 1:
        raise QMambaError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_calibration_size(args.nsamples, args.seqlen, "--nsamples x --seqlen")
    loaded = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if loaded.model.quant_state is not None:
        raise QMambaError("inspect analyses float models; this model is already quantized")
    if layers is not None:
        parse_layers(args.layers, loaded.model.config.n_layer)
    try:
        stats = inspect_model(loaded, args.out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                              bits=args.bits, layers=layers, force=args.force, seed=args.seed,
                              batch_size=args.batch_size, progress=True)
    except OSError as e:                 # the folder went away or the disk filled up meanwhile
        raise QMambaError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    m = stats["model"]
    print(f"{m['name']}: {m['arch']}, {m['parameters'] / 1e6:.2f} M parameters; {stats['data']['nsamples']} x "
          f"{stats['data']['seqlen']} tokens in {stats['seconds']:.1f} s")
    names = list(stats["layers"][0]["sqnr_db"])
    print("layer  ch max/med  n max/med  " + "  ".join(f"{n:>14}" for n in names) + f"   (SQNR dB at H{stats['bits']})")
    for L in stats["layers"]:
        s = L["state"]
        print(f"{L['layer']:>5}  {s['channel_ratio']:>10.1f}  {s['state_ratio']:>9.1f}  "
              + "  ".join(f"{L['sqnr_db'][n]:>14.1f}" for n in names))
    print(f"wrote {len(stats['files'])} plots, summary.md and stats.json to {args.out}")
    return 0
