"""Quality table of the quantization core (issue 4): every state quantizer at H8/H4/H3/H2 on
top of W8A8 round-to-nearest linears, the W8A8 baselines, and W4A8H4 for the main rows, on the
reference models, with the state re-quantized after every token.

    python benchmarks/quality_table.py --model ref-mamba2 --json benchmarks/results/quality_ref-mamba2.json

Perplexity on the shipped test text (windows of --seqlen, the first --max-tokens tokens), the
nextsent_proxy accuracy for the main rows (first --limit items). Markdown to stdout and into
the JSON. Every row sees the same calibration windows and test tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qmamba.api import load
from qmamba.eval.perplexity import tokenize_text_file
from qmamba.eval.suite import EvalSetup, Row, float_config, markdown, run_row
from qmamba.quant.calibrate import calibration_ids
from qmamba.quantize import quantize
from qmamba.utils.io import atomic_write_json
from qmamba.utils.paths import TEST_TEXT as TEST
STATE_ROWS = [  # (label, state_quant, state_scale)
    ("tensor-static", "tensor", "static"), ("tensor-dyn", "tensor", "dynamic"),
    ("channel-static", "channel", "static"), ("channel-dyn", "channel", "dynamic"),
    ("state-static", "state", "static"), ("state-dyn", "state", "dynamic"),
    ("head-dyn", "head", "dynamic"), ("group8-dyn", "group", "dynamic"),
    ("dsq-static", "dsq", "static"), ("dsq-dyn", "dsq", "dynamic"),
]


def rows(arch: str, bits: list[int], fp_config: str = "FP32") -> list[tuple[Row, bool]]:
    """(row, main) pairs; main rows also get the proxy-task accuracy. fp_config labels the float
    row with the dtype it is computed in (`float_config`)."""
    out = [(Row("fp", fp_config, {}, "fp"), True)]
    out += [(Row(m, "w8a8", {}, m), True) for m in ("rtn", "smoothquant", "quamba")]
    for b in bits:
        for label, kind, scale in STATE_ROWS:
            if kind == "head" and arch == "mamba1":
                continue                      # Mamba1 has p = 1: per-head is per-channel
            main = b == 4 and label in ("tensor-static", "channel-dyn", "dsq-static", "dsq-dyn")
            out.append((Row("rtn" if kind != "dsq" else "dsq", f"w8a8h{b}",
                            {"state_quant": kind, "state_scale": scale}, label), main))
    for label, kind, scale in (("tensor-static", "tensor", "static"), ("channel-dyn", "channel", "dynamic"),
                               ("dsq-dyn", "dsq", "dynamic")):
        out.append((Row("rtn" if kind != "dsq" else "dsq", "w4a8h4",
                        {"state_quant": kind, "state_scale": scale, "w_group_size": 128}, label), True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-mamba2")
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=0, help="0 = the whole test text")
    ap.add_argument("--limit", type=int, default=0, help="nextsent_proxy items for the main rows (0 = all)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default all)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    loaded = load(args.model)
    setup = EvalSetup(test_ids=tokenize_text_file(TEST, loaded.tokenizer),
                      calib_ids=calibration_ids(loaded.tokenizer, None, args.nsamples, args.calib_seqlen, 0),
                      seqlen=args.seqlen, max_tokens=args.max_tokens or None, tasks=(),
                      limit=args.limit or None)
    main_setup = EvalSetup(**{**setup.__dict__, "tasks": ("nextsent_proxy",)})
    done = {}
    fp_config = float_config(loaded.model)
    if args.json.exists():                   # resume: keep finished rows
        for r in json.loads(args.json.read_text()).get("results", []):
            if r["method"] == "fp":          # earlier runs labelled this float32 row "FP16"
                r["config"] = fp_config
            done[(r["label"], r["config"])] = r
    only = {s for s in args.only.split(",") if s}
    results = []
    t0 = time.time()
    for row, is_main in rows(loaded.model.config.arch, [int(b) for b in args.bits.split(",")], fp_config):
        if only and row.label not in only:
            continue
        key = (row.label, row.config)
        if key not in done:
            t = time.time()
            done[key] = run_row(loaded.model, loaded.tokenizer, row, main_setup if is_main else setup, quantize)
            print(f"{row.label:15s} {row.config:7s} ppl {done[key]['perplexity']:.3f} ({time.time() - t:.0f} s)", flush=True)
            results = list(done.values())
            atomic_write_json(args.json, {"model": args.model, "results": results})
    results = list(done.values())
    fp = next(r["perplexity"] for r in results if r["method"] == "fp")
    table = markdown(results, fp)
    scope = (f"{args.model}: test text, windows of {args.seqlen}, {results[0]['tokens']:,} predicted tokens; "
             f"calibration {args.nsamples} x {args.calib_seqlen}; nextsent_proxy on the main rows"
             + (f" (first {args.limit} items)" if args.limit else ""))
    print(table)
    print(scope)
    atomic_write_json(args.json, {"model": args.model, "scope": scope, "results": results, "markdown": table,
                                  "command": "python benchmarks/quality_table.py " + " ".join(argv or sys.argv[1:]),
                                  "seconds_this_run": round(time.time() - t0, 1),
                                  "seconds_all_rows": round(sum(r.get("quant_seconds", 0) + r.get("ppl_seconds", 0)
                                                                + r.get("task_seconds", 0) for r in results), 1)})


if __name__ == "__main__":
    main()
