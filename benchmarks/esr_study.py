"""ESR simulation study (issue 5): for each state simulation (readout, chunk, errscan, exact),
on a reference model,

  1. fidelity: on the calibration windows, each block's output under the simulation vs under the
     exact per-token quantized recurrence, with the same (calibrated, not yet reconstructed)
     quantizers: relative error ||y_sim - y_exact|| / ||y_exact - y_fp|| (the share of the true
     quantization effect the simulation gets wrong; 0 is perfect, 1 is no better than ignoring
     the state quantization) and ||y_sim - y_exact|| / ||y_exact||;
  2. time: seconds per block of reconstruction with each simulation, side by side in one run;
  3. result: test perplexity after the whole ESR with each simulation (exact evaluation).

    python benchmarks/esr_study.py --model ref-mamba2 --json benchmarks/results/esr_study_ref-mamba2.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from qmamba.api import load
from qmamba.eval.perplexity import perplexity, tokenize_text_file
from qmamba.methods.esr import ESRConfig, reconstruct
from qmamba.quant.apply import install_quantizers, quantize_weights
from qmamba.quant.calibrate import calibration_ids, run_calibration
from qmamba.quant.sim import SIMS, StateSim
from qmamba.methods import resolve_config
from qmamba.utils.io import atomic_write_json
from qmamba.utils.paths import TEST_TEXT as TEST


def calibrated(fp_model, qcfg, calib):
    m = copy.deepcopy(fp_model)
    install_quantizers(m, qcfg)
    run_calibration(m, calib, progress=False)
    return m


@torch.no_grad()
def fidelity(model, ids, sims) -> dict:
    """Per block: outputs of the mixer under each simulation vs exact and vs float."""
    hidden = model.backbone.embeddings(ids).float()
    out = {s: [] for s in sims}
    for block in model.backbone.layers:
        mixer = block.mixer
        x = block.norm(hidden)
        y_exact = mixer(x)
        sq = mixer.state_quant
        sq.mode = "off"
        y_fp = mixer(x)
        sq.mode = "quant"
        for s in sims:
            mixer.state_sim = StateSim(s, sq)
            mixer.train()
            y = mixer(x)
            mixer.eval()
            mixer.state_sim = None
            err = (y - y_exact).norm().item()
            out[s].append({"vs_effect": err / max((y_exact - y_fp).norm().item(), 1e-12),
                           "rel": err / y_exact.norm().item()})
        hidden = block(hidden)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-mamba2")
    ap.add_argument("--config", default="w8a8h4")
    ap.add_argument("--state-scale", default="static", help="dsq channel scale mode (static: where ESR matters)")
    ap.add_argument("--sims", default=",".join(SIMS))
    ap.add_argument("--nsamples", type=int, default=ESRConfig.nsamples)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=ESRConfig.epochs)
    ap.add_argument("--lr", type=float, default=ESRConfig.lr)
    ap.add_argument("--fidelity-samples", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    sims = [s for s in args.sims.split(",") if s]
    torch.set_num_threads(args.threads)

    loaded = load(args.model)
    tok, fp_model = loaded.tokenizer, loaded.model
    qcfg = resolve_config(args.config, "qmamba", state_scale=args.state_scale)
    calib = calibration_ids(tok, None, 128, 512, 0)
    test = tokenize_text_file(TEST, tok)
    base = calibrated(fp_model, qcfg, calib)

    fid = fidelity(base, calib[: args.fidelity_samples, : args.seqlen], sims)
    results = {"model": args.model, "config": qcfg.to_dict(), "fidelity": fid, "runs": {}}
    fp_ppl = perplexity(fp_model, test, args.eval_seqlen, args.max_tokens, batch_size=16, progress=False)
    m = copy.deepcopy(base)
    quantize_weights(m, qcfg)
    no_esr = perplexity(m, test, args.eval_seqlen, args.max_tokens, batch_size=16, progress=False)
    results.update(fp_perplexity=fp_ppl["perplexity"], no_esr_perplexity=no_esr["perplexity"])
    for s in sims:
        m = copy.deepcopy(base)
        t = time.time()
        rec = reconstruct(m, qcfg, calib, ESRConfig(sim=s, nsamples=args.nsamples, seqlen=args.seqlen,
                                                    epochs=args.epochs, lr=args.lr), progress=False)
        secs = time.time() - t
        quantize_weights(m, qcfg)
        ppl = perplexity(m, test, args.eval_seqlen, args.max_tokens, batch_size=16, progress=False)
        results["runs"][s] = {"seconds": round(secs, 1), "seconds_per_block": round(secs / len(rec), 2),
                              "perplexity": ppl["perplexity"], "blocks": rec}
        print(f"{s:8s} {secs / len(rec):6.1f} s/block  ppl {ppl['perplexity']:.3f}", flush=True)
        atomic_write_json(args.json, results)
    lines = ["| simulation | block-output error vs exact (share of the quantization effect, mean over blocks) "
             "| s / block | test ppl after ESR | vs exact sim |", "|---|---|---|---|---|"]
    ref = results["runs"].get("exact", {}).get("perplexity")
    for s in sims:
        r = results["runs"][s]
        f = sum(b["vs_effect"] for b in fid[s]) / len(fid[s])
        lines.append(f"| {s} | {f:.3f} | {r['seconds_per_block']:.1f} | {r['perplexity']:.3f} | "
                     + (f"{(r['perplexity'] / ref - 1) * 100:+.2f}%" if ref else "") + " |")
    results["markdown"] = "\n".join(lines)
    results["scope"] = (f"{args.model} {qcfg.name} dsq {args.state_scale}; ESR {args.nsamples} x {args.seqlen}, "
                        f"{args.epochs} epochs, lr {args.lr}; FP ppl {fp_ppl['perplexity']:.3f}, no ESR {no_esr['perplexity']:.3f}; "
                        f"ppl on {fp_ppl['tokens']:,} test tokens, windows of {args.eval_seqlen}")
    results["command"] = "python benchmarks/esr_study.py " + " ".join(argv or sys.argv[1:])
    atomic_write_json(args.json, results)
    print(results["markdown"])
    print(results["scope"])


if __name__ == "__main__":
    main()
