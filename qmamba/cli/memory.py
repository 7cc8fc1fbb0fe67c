"""`qmamba memory [MODEL] [--quant CONFIG] [--batch 1,64] [--context 4k,32k,128k] [--json OUT]`:
bytes of the weights (by dtype and by part) and of the conv and SSM state per batch size,
measured on the tensors the model allocates, side by side with the same model in FP16, with
ratios. With --context (tokens; a k suffix is x1024), also the KV cache of a hybrid's attention
layers after that many tokens, and the share of weights, KV cache, conv and SSM state in the
total, per context and batch; the KV cache is measured on the meta device (the cache each
attention layer allocates, float or that of its KV quantizer, fed meta tokens).

MODEL may also be the shape of a real checkpoint (mamba-130m, mamba-370m, mamba-2.8b,
mamba2-130m, mamba2-370m, mamba2-2.7b, codestral-mamba-7b; the hybrids nemotron-h-8b,
nemotron-nano-9b-v2, granite-4.0-h-tiny, granite-4.0-h-small): the model is then built on the
meta device, whose tensors carry shapes and dtypes but no data, and the report says so. Byte
counts do not depend on calibration, so --quant builds the quantized modules without it. Float
weights are counted in --dtype (default float16, as deployed); quantization scales stay float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import QMambaError
from ..models.shapes import SHAPES
from ..utils.io import atomic_write_json, check_output
from .common import add_model_args, positive_ints


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..methods import available

    p = subparsers.add_parser("memory", help="weight and state memory, quantized vs FP16",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(dtype="float16")
    p.add_argument("--quant", metavar="CONFIG", help="WxAyHz config to measure (e.g. w8a8h4)")
    p.add_argument("--method", default="qmamba", choices=available(), help="method whose modules to build (default qmamba)")
    p.add_argument("--state-quant", help="state quantizer (default: the method's)")
    p.add_argument("--state-scale", choices=("dynamic", "static"), help="state scale mode (default: the method's)")
    p.add_argument("--w-group-size", type=int, default=0, metavar="G")
    p.add_argument("--quantize-head", action="store_true", help="8-bit embedding and lm_head")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--context", metavar="TOKENS",
                   help="comma-separated context lengths in tokens, e.g. 4096,32768 or 4k,32k,128k: "
                        "add the KV cache and each part's share")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    p.set_defaults(func=run)
    return p


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:,.2f} MiB"


def parse_contexts(spec: str) -> list[int]:
    """'4k,32768,128k' -> [4096, 32768, 131072]; a one-line error unless all are positive."""
    vals = []
    for part in spec.split(","):
        v = part.strip().lower()
        if not v:
            continue
        mult = 1024 if v.endswith("k") else 1
        try:
            n = int(v[:-1] if mult > 1 else v) * mult
        except ValueError:
            n = 0
        if n <= 0:
            raise QMambaError(f"--context must be positive token counts separated by commas (a k suffix "
                              f"is x1024, e.g. 4k,32k,128k), got {spec!r}")
        vals.append(n)
    if not vals:
        raise QMambaError(f"--context must be positive token counts separated by commas, got {spec!r}")
    return vals


def _gib(b: int) -> str:
    return f"{b / 2 ** 30:,.3f} GiB"


def run(args) -> int:
    from ..eval.memory import cast_float_weights, memory_report
    from ..models.shapes import shape_config
    from ..methods import resolve_config
    from ..methods.checkpoint import build_structure, quantize_structure

    batches = positive_ints(args.batch, "--batch")
    contexts = parse_contexts(args.context) if args.context is not None else []
    if args.json is not None:
        check_output(args.json, "--json")
    qcfg = None
    if args.quant:
        opts = {k: v for k, v in dict(state_quant=args.state_quant, state_scale=args.state_scale,
                                      w_group_size=args.w_group_size, quantize_head=args.quantize_head).items() if v}
        qcfg = resolve_config(args.quant, args.method, **opts)
    if args.model in SHAPES:
        model = build_structure(shape_config(args.model), qcfg, args.method)
        source = f"{args.model} shapes (meta device: bytes of the tensors it would allocate)"
    else:
        from ..api import load

        model = load(args.model, device=args.device, tokenizer=args.tokenizer).model
        if qcfg is not None:
            if model.quant_state is not None:
                raise QMambaError(f"{args.model} is already quantized; drop --quant")
            quantize_structure(model, qcfg, args.method)
        source = args.model
    cast_float_weights(model, getattr(torch, args.dtype))
    if args.model not in SHAPES:         # a real model allocates its state: it must fit
        from ..eval.memory import state_bytes
        from ..models.budget import check_bytes

        b = max(batches)
        check_bytes(b * sum(state_bytes(model, 1).values()),
                    f"--batch {b:,}: the conv and SSM state of {b:,} sequences")
    q = model.quant_config
    report = {"model": args.model, "source": source, "float_dtype": args.dtype,
              "quantization": None if q is None else {"method": model.quant_method, **q.to_dict()},
              **memory_report(model, batches, contexts=contexts)}
    w = report["weights"]
    print(f"{source}; {'quantized ' + q.name if q else 'float'}; float weights in {args.dtype}")
    print(f"weights: {_mib(w['total'])} ({', '.join(f'{k} {_mib(v)}' for k, v in w['by_dtype'].items())}); "
          f"FP16 {_mib(w['fp16'])}; ratio {w['ratio']:.3f}")
    for b, r in report["batches"].items():
        s, s16 = r["state"], r["state_fp16"]
        print(f"batch {b}: state {_mib(s['total'])} (ssm {_mib(s['ssm'])}, conv {_mib(s['conv'])}) vs FP16 "
              f"{_mib(s16['total'])}; ssm ratio {r['ssm_ratio']:.3f}; total {_mib(r['total'])} vs FP16 "
              f"{_mib(r['total_fp16'])}; ratio {r['total_ratio']:.3f}")
    for ctx, rows in report.get("contexts", {}).items():
        for b, r in rows.items():
            q, f, sh = r["bytes"], r["fp16"], r["share"]
            print(f"context {int(ctx):,} x batch {b}: total {_gib(q['total'])} vs FP16 {_gib(f['total'])} "
                  f"(ratio {r['ratio']:.3f}); weights {_gib(q['weights'])} ({sh['weights']:.1%}), "
                  f"KV {_gib(q['kv'])} ({sh['kv']:.1%}), SSM {_gib(q['ssm'])} ({sh['ssm']:.1%}), "
                  f"conv {_gib(q['conv'])} ({sh['conv']:.1%})")
    if args.json:
        atomic_write_json(args.json, report)
    return 0
