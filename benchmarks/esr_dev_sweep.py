"""ESR's defaults judged on the dev texts only (never on a test text).

    python benchmarks/esr_dev_sweep.py --model ref-mamba2 --json benchmarks/results/esr_dev_ref-mamba2.json

For each setting of --grid (ESR options as key=value pairs joined by ',', settings separated by
';'; an empty setting is the current default, and the first setting is what the others are
judged against), `qmamba`
(DSQ + ESR) at W8A8H4 with compare's calibration (64 x 512 tokens of the validation text), then
the KL divergence to the float model on each dev text (the first --max-tokens tokens of
ood_drama_dev.txt and ood_tech_dev.txt, windows of 1024), with its 95% interval and the paired
intervals of the difference from dsq (no ESR) and from the current default.

The rule: a setting replaces the default only if its KLD is lower than the default's beyond the
paired interval on every dev text; the verdict is printed last and kept in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import qmamba
from qmamba.eval import kld, tokenize_text_file
from qmamba.methods.esr import ESRConfig
from qmamba.quant.calibrate import calibration_ids
from qmamba.utils.paths import DEV_TEXTS

DEV = {"drama-dev": DEV_TEXTS["ood-drama"], "tech-dev": DEV_TEXTS["ood-tech"]}


def _setting(spec: str) -> dict:
    """'sim=exact,epochs=8' -> the full ESRConfig options it means (defaults filled in)."""
    defaults = asdict(ESRConfig())
    opts = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = pair.partition("=")
        if key not in defaults or key in ("device", "resume_dir"):
            raise SystemExit(f"unknown ESR option {key!r} in --grid")
        opts[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value == "true"
    ESRConfig(**opts)                       # validates
    return {k: opts.get(k, defaults[k]) for k in ("sim", "epochs", "lr", "nsamples", "seqlen", "chunk")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-mamba2")
    ap.add_argument("--grid", default=";sim=chunk;sim=chunk,epochs=8,lr=0.01;epochs=2;lr=0.005",
                    help="';'-separated settings of ESR options (key=value, ','-separated); '' is the current "
                         "default; the first setting is the one the others are judged against "
                         "(default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    loaded = qmamba.load(args.model)
    calib = calibration_ids(loaded.tokenizer, None, 64, 512, 0)
    refs = {name: kld.fp_reference(loaded.model, tokenize_text_file(path, loaded.tokenizer), 1024, args.max_tokens)
            for name, path in DEV.items()}

    def measure(method: str, options: dict) -> dict:
        model = copy.deepcopy(loaded.model)
        t0 = time.time()
        qmamba.quantize(model, "w8a8h4", calib=calib, method=method, method_options=options or None,
                        progress=False)
        return {"quant_seconds": round(time.time() - t0, 1),
                "texts": {name: kld.evaluate_against(model, ref) for name, ref in refs.items()}}

    base = measure("dsq", {})
    rows, results = [], []
    for spec in args.grid.split(";"):
        opts = _setting(spec)
        res = measure("qmamba", opts)
        results.append(res)
        default = results[0]
        row = {"options": opts, "quant_seconds": res["quant_seconds"], "texts": {}}
        for name, t in res["texts"].items():
            row["texts"][name] = {"kld": {k: v for k, v in t["kld"].items()}, "top1_agreement": t["top1_agreement"],
                                  "vs_dsq": kld.paired_interval(t, base["texts"][name]),
                                  "vs_default": kld.paired_interval(t, default["texts"][name])}
        row["mean_kld"] = sum(t["kld"]["mean"] for t in res["texts"].values()) / len(res["texts"])
        row["better_than_default"] = all(t["vs_default"][1] < 0 for t in row["texts"].values())
        rows.append(row)
        print(f"{spec or 'default'}: " + "; ".join(
            f"{n} KLD {t['kld']['mean']:.4f} [{t['kld']['ci95'][0]:.4f}, {t['kld']['ci95'][1]:.4f}], "
            f"vs dsq [{t['vs_dsq'][0]:+.4f}, {t['vs_dsq'][1]:+.4f}], vs default "
            f"[{t['vs_default'][0]:+.4f}, {t['vs_default'][1]:+.4f}]" for n, t in row["texts"].items()) +
            f"; {res['quant_seconds']:.0f} s", flush=True)
    dsq = {n: {"kld": t["kld"], "top1_agreement": t["top1_agreement"]} for n, t in base["texts"].items()}
    print("dsq (no ESR): " + "; ".join(f"{n} KLD {t['kld']['mean']:.4f}" for n, t in dsq.items()))
    winners = [r for r in rows[1:] if r["better_than_default"]]
    chosen = min(winners, key=lambda r: r["mean_kld"]) if winners else rows[0]
    verdict = ("keep the default: no setting is better on every dev text beyond the paired interval"
               if not winners else f"replace the default by {chosen['options']}")
    print(verdict)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "dev_texts": {k: str(v.name) for k, v in DEV.items()},
                                         "max_tokens": args.max_tokens, "dsq": dsq, "rows": rows,
                                         "chosen": chosen["options"], "verdict": verdict}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
