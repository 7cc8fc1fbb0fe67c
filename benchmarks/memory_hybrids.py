"""Memory of the hybrid checkpoints at their real shapes (meta device): weights, KV cache, conv and
SSM state in FP16 and at W8A8, W8A8H4, W8A8H4KV8 and W8A8H4KV4, per batch size and context
length, with the share each part takes. One JSON per shape (benchmarks/results/
memory_hybrid_<shape>.json) and, with --markdown, the tables of docs/performance.md.

    python benchmarks/memory_hybrids.py --markdown

Every number is `qmamba memory SHAPE --quant CONFIG --batch 1,64 --context 4k,32k,128k`
(qmamba.eval.memory.memory_report): bytes of the tensors the model and its caches hold, float
weights in float16, quantization scales float32, the float SSM/conv state and KV cache in float16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from qmamba.eval.memory import cast_float_weights, memory_report
from qmamba.methods import resolve_config
from qmamba.methods.checkpoint import build_structure
from qmamba.models import MambaLM
from qmamba.models.shapes import HYBRID_SHAPES, shape_config
from qmamba.utils.io import atomic_write_json

CONFIGS = ("fp16", "w8a8", "w8a8h4", "w8a8h4kv8", "w8a8h4kv4")
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2 ** 30


def measure(shape: str, configs, batches, contexts, method: str) -> dict:
    cfg = shape_config(shape)
    with torch.device("meta"):
        params = MambaLM(cfg).num_parameters()
    out = {"shape": shape, "source_config": HYBRID_SHAPES.get(shape), "parameters": params,
           "layer_types": {t: cfg.layer_types.count(t) for t in dict.fromkeys(cfg.layer_types)},
           "method": method, "float_dtype": "float16", "meta": True, "batches": list(batches),
           "contexts": list(contexts), "configs": {}}
    for name in configs:
        t0 = time.perf_counter()
        qcfg = None if name == "fp16" else resolve_config(name, method)
        model = cast_float_weights(build_structure(cfg, qcfg, method), torch.float16)
        r = memory_report(model, batches, contexts=contexts)
        out["configs"][name.upper()] = {"quantization": None if qcfg is None else qcfg.to_dict(),
                                        "weights": r["weights"], "contexts": r["contexts"]}
        print(f"{shape} {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def _ctx(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def markdown(report: dict) -> str:
    """One table per shape: a row per config and batch; per context the total in GiB and the
    shares of weights / KV cache / SSM state (conv state: the rest, under 0.5%)."""
    ctxs = report["contexts"]
    head = "| config | batch | " + " | ".join(f"{_ctx(c)}: GiB | W / KV / SSM %" for c in ctxs) + " |"
    lines = [head, "|---|---|" + "---:|---|" * len(ctxs)]
    for name, r in report["configs"].items():
        for b in report["batches"]:
            cells = []
            for c in ctxs:
                row = r["contexts"][str(c)][str(b)]
                sh = row["share"]
                cells.append(f"{row['bytes']['total'] / GIB:,.1f}")
                cells.append(f"{100 * sh['weights']:.0f} / {100 * sh['kv']:.0f} / {100 * sh['ssm']:.1f}")
            lines.append(f"| {'FP16' if name == 'FP16' else name} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(HYBRID_SHAPES), help="comma-separated hybrid shapes")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", default="4096,32768,131072", help="tokens")
    ap.add_argument("--method", default="qmamba")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/performance.md")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    for shape in args.shapes.split(","):
        report = measure(shape, args.configs.split(","), batches, contexts, args.method)
        atomic_write_json(args.out / f"memory_hybrid_{shape}.json", report)
        if args.markdown:
            w = report["configs"]
            fp16, w8 = w["FP16"]["weights"], w.get("W8A8", w["FP16"])["weights"]
            print(f"\n**{shape}** ({report['parameters'] / 1e9:.2f}B parameters; "
                  + ", ".join(f"{n} {t}" for t, n in report["layer_types"].items())
                  + f"): weights {fp16['total'] / GIB:.2f} GiB in FP16, {w8['total'] / GIB:.2f} GiB at W8A8\n")
            print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
