"""`qmamba quantize [MODEL] --config w8a8h4 [--method qmamba] --out DIR`: quantize a float model with
calibration text and save it (integer weights, scales, quantization_config), atomically.

The folder loads with every other command (`qmamba eval DIR`, `qmamba generate DIR`, ...) and
with `qmamba.load(DIR)`; reloading gives the same logits bit for bit.

`--low-memory` quantizes block by block from the memory-mapped safetensors files, holding one
block's float weights and the calibration activations, and writes the folder shard by shard: the
same tensors as without it (methods rtn, dsq, qmamba). It is chosen automatically, with a log
line, when the float model would not fit in the memory available.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..utils.io import check_output
from .common import add_model_args, add_quant_args, describe, load_model

log = logging.getLogger("qmamba")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="quantize a model and save it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, config_flag="--config", default_config="w8a8h4")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--low-memory", action="store_true",
                   help="quantize block by block from the memory-mapped safetensors (one block in memory); "
                        "automatic when the float model does not fit")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..quant.checkpoint import save_quantized

    check_output(args.out, "--out", folder=True, force=args.force)      # before hours of calibration
    if args.low_memory or _too_big(args):
        return run_low_memory(args)
    loaded = load_model(args)
    tok_dir = args.tokenizer if args.tokenizer is not None and args.tokenizer.is_dir() else loaded.path
    save_quantized(loaded.model, args.out, tokenizer_dir=tok_dir, force=args.force)   # write errors: one line
    print(describe(loaded))
    print(f"quantized in {loaded.model.quant_state.seconds:.1f} s; saved to {args.out}")
    _print_config(args.out)
    return 0


def _too_big(args) -> bool:
    from ..api import resolve_dtype, resolve_model_path
    from ..methods.streaming import too_big_for_memory

    if args.device != "cpu":
        return False
    why = too_big_for_memory(resolve_model_path(args.model), resolve_dtype(args.dtype))
    if why is not None:
        log.warning("%s: %s; quantizing block by block (--low-memory)", args.model, why)
    return why is not None


def run_low_memory(args) -> int:
    from ..errors import QMambaError
    from ..quantize import quantize_low_memory
    from ..api import resolve_model_path
    from ..models.load import detect_format, model_config, read_config
    from .common import check_method_memory, check_quant_args, method_options, quant_options

    if args.device != "cpu":
        raise QMambaError("--low-memory quantizes on the CPU (ESR blocks still train on CUDA when present); "
                          "leave --device at cpu")
    check_quant_args(args)
    raw = read_config(resolve_model_path(args.model))
    check_method_memory(args, model_config(raw, detect_format(raw)))     # ESR's activations, before calibration
    stats = quantize_low_memory(args.model, args.out, args.quant, calib=args.calib, method=args.method,
                                tokenizer=args.tokenizer, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                                seed=args.quant_seed, dtype=args.dtype, method_options=method_options(args),
                                force=args.force, **quant_options(args))
    blocks = stats["blocks"]
    print(f"{args.model}: {args.method} {args.quant}, block by block ({len(blocks)} blocks, "
          f"{stats['seconds'] / max(1, len(blocks)):.1f} s per block on average)")
    print(f"quantized in {stats['seconds']:.1f} s; saved to {args.out}")
    _print_config(args.out)
    return 0


def _print_config(out: Path) -> None:
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = qc.get("qmamba", qc)            # compressed-tensors layout: qmamba's fields nested
    print(json.dumps({k: qc[k] for k in ("config", "method", "state_quant", "state_scale", "format_version")}))
