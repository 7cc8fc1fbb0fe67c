"""Options every model-taking command shares: the model, dtype, device, tokenizer, and the
quantization options (for `quantize`, and for quantizing in memory with `--quant`)."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

from ..api import DEFAULT_MODEL, DTYPES, load
from ..errors import QMambaError

log = logging.getLogger("qmamba")


def positive_ints(spec: str, what: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]; a one-line error naming `what` unless all are positive integers."""
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(v <= 0 for v in vals):
        raise QMambaError(f"{what} must be positive integers separated by commas, got {spec!r}")
    return vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"reference model name, model folder (float or quantized) or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float dtype (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="tokenizer folder or tokenizer.json (default: the model's own)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: every core this process may run on)")


def add_quant_args(p: argparse.ArgumentParser, config_flag: str = "--quant", default_method: str = "qmamba",
                   default_config: str | None = None) -> None:
    from ..methods import available
    from ..quant.config import ROUNDINGS, SCALE_MODES, STATE_QUANTIZERS

    g = p.add_argument_group("quantization")
    g.add_argument(config_flag, dest="quant", metavar="CONFIG", default=default_config,
                   help="WxAyHz config, e.g. w8a8h4, w8a8, w4a16, h4" +
                   (f" (default {default_config})" if default_config else " (quantize in memory before running)"))
    g.add_argument("--method", default=default_method, choices=available(),
                   help=f"quantization method (default {default_method})")
    g.add_argument("--calib", type=Path, metavar="FILE", help="calibration text (default: the shipped validation text)")
    g.add_argument("--nsamples", type=int, default=128, metavar="N", help="calibration sequences (default 128)")
    g.add_argument("--calib-seqlen", type=int, default=512, metavar="L", help="calibration sequence length (default 512)")
    seed_flag = "--quant-seed" if "--seed" in p._option_string_actions else "--seed"
    g.add_argument(seed_flag, dest="quant_seed", type=int, default=0,
                   help="calibration sampling and stochastic-rounding seed (default 0)")
    g.add_argument("--state-quant", choices=list(STATE_QUANTIZERS),
                   help="state quantizer (default: the method's; dsq for dsq/qmamba, tensor for the baselines)")
    g.add_argument("--state-scale", choices=SCALE_MODES, help="per-write (dynamic) or calibrated (static) state scales")
    g.add_argument("--state-rounding", choices=ROUNDINGS, default="nearest", help="state write rounding")
    g.add_argument("--a-dynamic", action="store_true", help="dynamic per-token activation scales (default static per-tensor)")
    g.add_argument("--w-group-size", type=int, default=0, metavar="G", help="weight groups along the input dim (default per channel)")
    g.add_argument("--quantize-head", action="store_true", help="also quantize embedding and lm_head")
    add_esr_args(p)


# ESR flag -> ESRConfig field (method qmamba only)
ESR_FLAGS = {"esr_sim": "sim", "esr_epochs": "epochs", "esr_lr": "lr", "esr_nsamples": "nsamples",
             "esr_seqlen": "seqlen", "esr_batch_size": "batch_size", "esr_dt_bias": "learn_dt_bias",
             "esr_resume": "resume_dir"}


def add_esr_args(p: argparse.ArgumentParser, rows: bool = False) -> None:
    """The --esr-* flags; `rows`: for compare, where they apply to every row that runs ESR."""
    from ..methods.esr import ESRConfig
    from ..quant.sim import SIMS

    d = ESRConfig()
    g = p.add_argument_group("ESR reconstruction (" + ("the rows that run ESR" if rows else "--method qmamba") + ")")
    g.add_argument("--esr-sim", choices=list(SIMS), help=f"quantized-state simulation while training (default {d.sim})")
    g.add_argument("--esr-epochs", type=int, metavar="E", help=f"epochs per block (default {d.epochs})")
    g.add_argument("--esr-lr", type=float, metavar="LR", help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--esr-nsamples", type=int, metavar="N",
                   help=f"calibration sequences used by ESR (default {d.nsamples})")
    g.add_argument("--esr-seqlen", type=int, metavar="L", help=f"tokens per ESR sequence (default {d.seqlen})")
    g.add_argument("--esr-batch-size", type=int, metavar="B", help=f"ESR batch size (default {d.batch_size})")
    g.add_argument("--esr-dt-bias", action="store_true", default=None, help="also learn the dt bias")
    if not rows:
        g.add_argument("--esr-resume", type=Path, metavar="DIR",
                       help="save each finished block here and resume an interrupted run from it")


def esr_options(args) -> dict:
    """ESRConfig options from the --esr-* flags that were given; an error if the method has no ESR."""
    opts = {field: getattr(args, flag) for flag, field in ESR_FLAGS.items() if getattr(args, flag, None) is not None}
    if opts and args.method != "qmamba":
        given = ", ".join("--" + f.replace("_", "-") for f in ESR_FLAGS if getattr(args, f, None) is not None)
        raise QMambaError(f"{given} only apply to --method qmamba (ESR), not {args.method}")
    return opts


def quant_options(args) -> dict:
    """QuantConfig keyword options from the parsed quantization arguments."""
    opts = dict(state_rounding=args.state_rounding, a_dynamic=args.a_dynamic,
                w_group_size=args.w_group_size, quantize_head=args.quantize_head)
    if args.state_quant:
        opts["state_quant"] = args.state_quant
    if args.state_scale:
        opts["state_scale"] = args.state_scale
    return opts


def check_calibration_size(nsamples: int, seqlen: int, flags: str = "--nsamples x --calib-seqlen") -> None:
    """The calibration windows (int64 ids, one row object each) must fit in memory."""
    from ..models.budget import check_bytes

    check_bytes(nsamples * (seqlen * 8 + 256), f"{flags} = {nsamples:,} x {seqlen:,} calibration tokens")


def check_quant_args(args) -> None:
    from ..quant.config import QuantConfig

    if args.nsamples < 1 or args.calib_seqlen < 2:
        raise QMambaError("--nsamples must be >= 1 and --calib-seqlen >= 2")
    QuantConfig.parse(args.quant, **quant_options(args))            # fail fast on a bad config
    from ..methods.esr import ESRConfig

    ESRConfig(**{k: v for k, v in esr_options(args).items() if k != "resume_dir"})
    lr = getattr(args, "esr_lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise QMambaError(f"--esr-lr must be a positive number, got {lr}")
    # ESR trains on the first N calibration sequences, their first L tokens: no more exist
    if getattr(args, "esr_nsamples", None) is not None and args.esr_nsamples > args.nsamples:
        raise QMambaError(f"--esr-nsamples {args.esr_nsamples:,} is more than the --nsamples {args.nsamples:,} "
                          "calibration sequences ESR takes them from")
    if getattr(args, "esr_seqlen", None) is not None and args.esr_seqlen > args.calib_seqlen:
        raise QMambaError(f"--esr-seqlen {args.esr_seqlen:,} is longer than the --calib-seqlen "
                          f"{args.calib_seqlen:,} calibration sequences ESR takes them from")
    check_calibration_size(args.nsamples, args.calib_seqlen)
    if getattr(args, "esr_resume", None) is not None:
        from ..utils.io import check_output

        check_output(args.esr_resume, "--esr-resume", folder=True, force=True)
        resume = Path(args.esr_resume)
        if resume.is_dir() and any(resume.iterdir()) and not (resume / "progress.json").is_file():
            raise QMambaError(f"--esr-resume {resume} is neither empty nor an ESR resume folder (no progress.json); "
                              "give a new or empty folder")
        out = getattr(args, "out", None)
        if out is not None and Path(os.path.abspath(out)) in (p := Path(os.path.abspath(resume)), *p.parents):
            raise QMambaError(f"--esr-resume {resume} must be outside --out {out}, which is replaced when saving")


def check_esr_size(args, cfg) -> None:
    """ESR keeps four (N, L, d_model) float32 activation sets (float and quantized inputs and
    outputs of the block it trains): they must fit in memory, before calibration starts."""
    if args.method != "qmamba":
        return
    from ..methods.esr import ESRConfig
    from ..models.budget import check_bytes

    d = ESRConfig()
    n = min(args.esr_nsamples or d.nsamples, args.nsamples)
    L = min(args.esr_seqlen or d.seqlen, args.calib_seqlen)
    check_bytes(4 * n * L * cfg.d_model * 4,
                f"ESR on {n:,} sequences x {L:,} tokens x d_model {cfg.d_model:,} (--esr-nsamples, --esr-seqlen)")


def load_model(args, quantize_in_memory: bool = True, before_quantize=None):
    """Load args.model; with --quant, quantize it in memory (`qmamba.quantize`), calling
    `before_quantize(loaded)` on the float model first (e.g. to keep its outputs as a reference)."""
    if quantize_in_memory and getattr(args, "quant", None):
        check_quant_args(args)
    loaded = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if quantize_in_memory and getattr(args, "quant", None):
        from ..quantize import quantize

        if getattr(loaded.model, "quant_config", None) is not None:
            raise QMambaError(f"{args.model} is already quantized; --quant applies to float models")
        check_esr_size(args, loaded.model.config)
        if before_quantize is not None:
            before_quantize(loaded)
        quantize(loaded, args.quant, calib=args.calib, method=args.method, nsamples=args.nsamples,
                 seqlen=args.calib_seqlen, seed=args.quant_seed, method_options=esr_options(args),
                 **quant_options(args))
        log.info("quantized in memory: %s %s in %.1f s", args.method, loaded.model.quant_config.name,
                 loaded.model.quant_seconds)
    return loaded


def describe(loaded) -> str:
    m = loaded.model
    q = getattr(m, "quant_config", None)
    if q is None:
        return f"{loaded.name}: {m.config.arch}, {m.num_parameters() / 1e6:.2f} M parameters, float"
    return f"{loaded.name}: {m.config.arch}, {m.quant_method} {q.name} (state {q.state_quant}, {q.state_scale} scales)"
