"""`qmamba quantize [MODEL] --config w8a8h4 [--method qmamba] --out DIR`: quantize a float model with
calibration text and save it (integer weights, scales, quantization_config), atomically.

The folder loads with every other command (`qmamba eval DIR`, `qmamba generate DIR`, ...) and
with `qmamba.load(DIR)`; reloading gives the same logits bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..utils.io import check_output
from .common import add_model_args, add_quant_args, describe, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="quantize a model and save it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, config_flag="--config", default_config="w8a8h4")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..quant.checkpoint import save_quantized

    check_output(args.out, "--out", folder=True, force=args.force)      # before hours of calibration
    loaded = load_model(args)
    tok_dir = args.tokenizer if args.tokenizer is not None and args.tokenizer.is_dir() else loaded.path
    save_quantized(loaded.model, args.out, tokenizer_dir=tok_dir, force=args.force)   # write errors: one line
    print(describe(loaded))
    print(f"quantized in {loaded.model.quant_state.seconds:.1f} s; saved to {args.out}")
    qc = json.loads((args.out / "config.json").read_text())["quantization_config"]
    qc = qc.get("qmamba", qc)            # compressed-tensors layout: qmamba's fields nested
    print(json.dumps({k: qc[k] for k in ("config", "method", "state_quant", "state_scale", "format_version")}))
    return 0
