"""ESR on a real-checkpoint shape with random weights (issue 5): does `qmamba` (DSQ + ESR) run
at that size, how long does each block take, and how much memory does it need? Random weights
say nothing about quality; this is about crashes, time and memory, so that a user with
`state-spaces/mamba2-2.7b` knows what to expect (time per block scales with d_model x d_state and
the number of ESR tokens; a 2.7b block is about 3.3x a 130m block's width).

    python benchmarks/esr_real_shape.py --shape mamba2-130m --json benchmarks/results/esr_mamba2-130m.json

Calibration windows come from the shipped validation text tokenized with the project tokenizer
(valid ids of any vocabulary of >= 8192 tokens). Peak memory is the process's VmHWM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from qmamba.api import load
from qmamba.methods.esr import ESRConfig
from qmamba.eval.timing import peak_rss
from qmamba.models.lm import MambaLM, init_weights
from qmamba.models.shapes import shape_config
from qmamba.quant.calibrate import calibration_ids
from qmamba.quant.sim import SIMS
from qmamba.quantize import quantize
from qmamba.utils.io import atomic_write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mamba2-130m")
    ap.add_argument("--config", default="w8a8h4")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration and ESR sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration and ESR tokens per sequence")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sim", default=ESRConfig.sim, choices=SIMS, help="ESR simulation (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = shape_config(args.shape)
    model = init_weights(MambaLM(cfg), 0).eval()
    tok = load("ref-mamba2").tokenizer
    calib = calibration_ids(tok, None, args.nsamples, args.seqlen, 0)
    t = time.time()
    quantize(model, args.config, calib=calib, method="qmamba", progress=False,
             method_options=dict(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, sim=args.sim))
    total = time.time() - t
    with torch.no_grad():
        logits = model(calib[:2, :64])
    recs = model.quant_state.records
    out = {"shape": args.shape, "config": args.config, "params": sum(p.numel() for p in MambaLM(cfg).parameters()),
           "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs": args.epochs, "sim": args.sim, "threads": args.threads,
           "quantize_seconds": round(total, 1), "esr_seconds_per_block": round(sum(r["seconds"] for r in recs) / len(recs), 2),
           "blocks": len(recs), "blocks_kept": sum(r["kept"] for r in recs), "peak_rss_mib": round(peak_rss() / 2 ** 20, 1),
           "finite_logits": bool(torch.isfinite(logits).all()), "records": recs,
           "device": "cpu", "command": "python benchmarks/esr_real_shape.py " + " ".join(argv or sys.argv[1:])}
    atomic_write_json(args.json, out)
    print(f"{args.shape} {args.config}: quantize (calibration + ESR) {total:.0f} s, ESR {out['esr_seconds_per_block']} s "
          f"per block x {len(recs)} ({out['blocks_kept']} kept), peak RSS {out['peak_rss_mib']} MiB, "
          f"finite logits {out['finite_logits']}")


if __name__ == "__main__":
    main()
