"""Options every model-taking command shares: the model, dtype, device, tokenizer, and the
quantization options (for `quantize`, and for quantizing in memory with `--quant`)."""

from __future__ import annotations

import argparse
import logging
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
    g.add_argument("--kv-group-size", type=int, default=32, metavar="G",
                   help="tokens per key scale of a quantized KV cache (hybrids; default %(default)s)")
    g.add_argument("--quantize-head", action="store_true", help="also quantize embedding and lm_head")
    add_method_option_args(p)


def method_option_classes() -> list[tuple[type, list[str]]]:
    """(options dataclass, the methods that take it) for every method with options."""
    from ..methods import available, get_method
    from ..methods.registry import option_fields

    classes: dict[type, list[str]] = {}
    for name in available():
        classes.setdefault(get_method(name).options, []).append(name)
    return [(cls, names) for cls, names in classes.items() if option_fields(cls)]


def add_method_option_args(p: argparse.ArgumentParser, rows: bool = False) -> None:
    """A flag --<prefix>-<field> for every field of every method's options dataclass (e.g.
    --esr-epochs); `rows`: for compare, where they apply to every row whose method takes them."""
    from ..methods.registry import option_fields

    for cls, names in method_option_classes():
        fields = [f for f in option_fields(cls) if f.per_row or not rows]
        g = p.add_argument_group(f"{cls.cli_title} options (" + (
            "the rows that run it" if rows else f"--method {', '.join(names)}") + ")")
        for f in fields:
            kw: dict = dict(dest=f.dest, default=None, help=f.help)
            if f.type is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = f.type
                if f.choices:
                    kw["choices"] = list(f.choices)
                if f.metavar:
                    kw["metavar"] = f.metavar
            g.add_argument(f.flag, **kw)


def given_method_options(args) -> dict[type, dict]:
    """{options dataclass: {field: value}} of the method option flags given."""
    from ..methods.registry import option_fields

    out: dict[type, dict] = {}
    for cls, _ in method_option_classes():
        opts = {f.name: getattr(args, f.dest) for f in option_fields(cls) if getattr(args, f.dest, None) is not None}
        if opts:
            out[cls] = opts
    return out


def method_options(args) -> dict:
    """The options of --method from the flags given; an error for flags of another method."""
    from ..methods import get_method
    from ..methods.registry import option_fields

    own = get_method(args.method).options
    given = given_method_options(args)
    errors = []
    for cls, names in method_option_classes():
        if cls in given and cls is not own:
            flags = ", ".join(f.flag for f in option_fields(cls) if f.name in given[cls])
            errors.append(f"{flags} only apply to --method {', '.join(names)} ({cls.cli_title}), not {args.method}")
    if errors:
        raise QMambaError("; ".join(errors))
    return given.get(own, {})


def option_flag(options: type):
    """field name -> its flag, for an options dataclass's messages."""
    from ..methods.registry import option_fields

    flags = {f.name: f.flag for f in option_fields(options)}
    return lambda name: flags[name]


def quant_options(args) -> dict:
    """QuantConfig keyword options from the parsed quantization arguments."""
    opts = dict(state_rounding=args.state_rounding, a_dynamic=args.a_dynamic,
                w_group_size=args.w_group_size, quantize_head=args.quantize_head, kv_group_size=args.kv_group_size)
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
    from ..methods import get_method
    from ..quant.config import QuantConfig

    if args.nsamples < 1 or args.calib_seqlen < 2:
        raise QMambaError("--nsamples must be >= 1 and --calib-seqlen >= 2")
    QuantConfig.parse(args.quant, **quant_options(args))            # fail fast on a bad config
    given = method_options(args)
    opts = get_method(args.method).make_options(given)
    if hasattr(opts, "check_run"):            # options checked against the calibration set, --out
        opts.check_run(option_flag(type(opts)), set(given), args.nsamples, args.calib_seqlen,
                       getattr(args, "out", None))
    check_calibration_size(args.nsamples, args.calib_seqlen)


def check_method_memory(args, cfg) -> None:
    """The working memory a method's options ask for (ESR's activation sets) must fit, before
    calibration starts."""
    from ..methods import get_method
    from ..models.budget import check_bytes

    opts = get_method(args.method).make_options(method_options(args))
    if hasattr(opts, "work_bytes"):
        check_bytes(*opts.work_bytes(cfg.d_model, args.nsamples, args.calib_seqlen))


def load_model(args, quantize_in_memory: bool = True, before_quantize=None):
    """Load args.model; with --quant, quantize it in memory (`qmamba.quantize`), calling
    `before_quantize(loaded)` on the float model first (e.g. to keep its outputs as a reference)."""
    if quantize_in_memory and getattr(args, "quant", None):
        check_quant_args(args)
    loaded = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if quantize_in_memory and getattr(args, "quant", None):
        from ..quantize import quantize

        if loaded.model.quant_state is not None:
            raise QMambaError(f"{args.model} is already quantized; --quant applies to float models")
        check_method_memory(args, loaded.model.config)
        if before_quantize is not None:
            before_quantize(loaded)
        quantize(loaded, args.quant, calib=args.calib, method=args.method, nsamples=args.nsamples,
                 seqlen=args.calib_seqlen, seed=args.quant_seed, method_options=method_options(args),
                 **quant_options(args))
        log.info("quantized in memory: %s %s in %.1f s", args.method, loaded.model.quant_config.name,
                 loaded.model.quant_state.seconds)
    return loaded


def describe(loaded) -> str:
    m = loaded.model
    q = m.quant_config
    if q is None:
        return f"{loaded.name}: {m.config.arch}, {m.num_parameters() / 1e6:.2f} M parameters, float"
    return f"{loaded.name}: {m.config.arch}, {m.quant_method} {q.name} (state {q.state_quant}, {q.state_scale} scales)"
