"""Which int8 matrix product is fastest here: the ways to compute one quantized linear layer on
this CPU, side by side, at the shapes of mamba2-130m (in_proj, out_proj, the tied head).

    python benchmarks/bench_int8.py --rows 1,16,512 --threads 2 --json benchmarks/results/bench_int8.json

Rows are activation rows (1 = a decode step at batch 1, 512 = a prompt). Candidates:
  fp32 / bf16         float GEMM on float weights (the float model's cost)
  dequant+fp32        dequantize the int8 weights, then the fp32 GEMM (the simulated path)
  torch._int_mm       int8 x int8 -> int32 in PyTorch (oneDNN on CPU)
  _weight_int8pack_mm float activations x int8 weights in PyTorch
  qmamba i8           qmamba's C kernel (the best build here; QMAMBA_CPU_ISA forces a lower one):
                      activations quantized in the kernel, int8 x int8
  qmamba f32i8        qmamba's C kernel: float activations x int8 weights (the 8-bit head)
Median of --reps timed calls after two warm-up calls; milliseconds per call.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from qmamba.eval.timing import median_seconds
from qmamba.kernels import lookup
from qmamba.utils.io import atomic_write_json

SHAPES = {"in_proj (3352 x 768)": (3352, 768), "out_proj (768 x 1536)": (768, 1536),
          "head (50280 x 768)": (50280, 768)}


def candidates(x, codes, scale):
    w = codes.float() * scale[:, None]
    wb = w.bfloat16()
    xb = x.bfloat16()
    s_x = x.abs().amax(-1).clamp(min=1e-12) / 127
    q_x = torch.round(x / s_x[:, None]).clamp(-127, 127).to(torch.int8)
    out = {
        "fp32": lambda: x @ w.t(),
        "bf16": lambda: xb @ wb.t(),
        "dequant+fp32": lambda: x @ (codes.float() * scale[:, None]).t(),
        "torch._int_mm": lambda: torch._int_mm(q_x, codes.t()).float() * (s_x[:, None] * scale),
        "_weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scale),
    }
    i8, f32i8 = lookup("i8_linear_quantizing", "cpu"), lookup("f32i8_linear", "cpu")
    if i8 is not None and f32i8 is not None:
        out["qmamba i8"] = lambda: i8(x, None, codes, scale, 0, None)
        out["qmamba f32i8"] = lambda: f32i8(x, codes, scale)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results, lines = [], []
    names = None
    for m in (int(r) for r in args.rows.split(",")):
        for label, (n, k) in SHAPES.items():
            codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            scale = torch.rand(n, generator=g) * 0.01
            x = torch.randn(m, k, generator=g)
            reps = max(3, args.reps if m * n < 1 << 22 else args.reps // 4)
            row = {"rows": m, "shape": label}
            for name, fn in candidates(x, codes, scale).items():
                try:
                    row[name] = median_seconds(fn, reps, warmup=2) * 1e3      # ms
                except RuntimeError as e:             # an op this build lacks
                    row[name] = None
                    print(f"{name}: {str(e).splitlines()[0]}", file=sys.stderr)
            results.append(row)
            names = names or [k for k in row if k not in ("rows", "shape")]
            lines.append(f"| {m} | {label} | " + " | ".join("-" if row[c] is None else f"{row[c]:.3f}" for c in names) + " |")
    head = "| rows | layer | " + " | ".join(names) + " |"
    table = "\n".join([head, "|" + "---|" * (len(names) + 2), *lines])
    print(table)
    if args.json:
        atomic_write_json(args.json, {"command": "python benchmarks/bench_int8.py " + " ".join(argv or sys.argv[1:]),
                                      "threads": args.threads, "machine": platform.processor() or platform.machine(),
                                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                      "torch_version": torch.__version__, "unit": "ms per call (median)",
                                      "results": results, "markdown": table})


if __name__ == "__main__":
    main()
