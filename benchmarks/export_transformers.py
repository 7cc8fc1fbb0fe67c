"""Load a qmamba export in transformers and compare its perplexity with qmamba's own.

    python benchmarks/export_transformers.py --model ref-mamba2 --config w8a8 --method rtn \
        --json benchmarks/results/export_transformers_ref-mamba2.json

For each --config/--method pair: `qmamba.quantize` the float model (default calibration),
`save_quantized` it (a compressed-tensors folder), load that folder with
`AutoModelForCausalLM.from_pretrained` (transformers with compressed-tensors: quantized linears,
float SSM state), and measure perplexity on the test text with `qmamba.eval.perplexity` for:
the float model, transformers' model, qmamba's model inside `transformers_view` (the quantization
points transformers has), and qmamba's model with every quantizer (what `qmamba eval` reports).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import qmamba
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.formats.compressed_tensors import transformers_view
from qmamba.quant.checkpoint import save_quantized
from qmamba.utils.paths import TEST_TEXT as TEST


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-mamba2")
    ap.add_argument("--config", action="append", help="WxAyHz (repeatable; default w8a8)")
    ap.add_argument("--method", action="append", help="one per --config (default rtn)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    configs = args.config or ["w8a8"]
    methods = args.method or ["rtn"] * len(configs)
    if len(methods) != len(configs):
        ap.error("give one --method per --config")
    base = qmamba.load(args.model)
    ids = tokenize_text_file(TEST, base.tokenizer)

    def ppl(model) -> float:
        return perplexity(model, ids, seqlen=args.seqlen, max_tokens=args.max_tokens, batch_size=4,
                          progress=False)["perplexity"]

    result = {"model": args.model, "seqlen": args.seqlen, "max_tokens": args.max_tokens,
              "torch": torch.__version__, "rows": []}
    import transformers
    result["transformers"] = transformers.__version__
    fp = ppl(base.model)
    for config, method in zip(configs, methods):
        t0 = time.time()
        loaded = copy.deepcopy(base)
        qmamba.quantize(loaded, config, method=method, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_quantized(loaded.model, Path(tmp) / "q", tokenizer_dir=base.path)
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

            class Logits(torch.nn.Module):          # perplexity() wants input_ids -> logits
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, x):
                    return self.m(x).logits

            row = {"config": config, "method": method, "float": fp, "transformers": ppl(Logits(hf))}
        with transformers_view(loaded.model):
            row["qmamba_transformers_view"] = ppl(loaded.model)
        row["qmamba_every_quantizer"] = ppl(loaded.model)
        row["relative_difference"] = row["transformers"] / row["qmamba_transformers_view"] - 1
        row["seconds"] = round(time.time() - t0, 1)
        result["rows"].append(row)
        print(f"{config} {method}: transformers {row['transformers']:.4f}, qmamba (transformers' view) "
              f"{row['qmamba_transformers_view']:.4f} ({row['relative_difference'] * 100:+.4f}%), qmamba "
              f"(every quantizer) {row['qmamba_every_quantizer']:.4f}, float {fp:.4f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
